//! Prints what waiting costs on this host (see `aqueduct_core::calibrate`).
fn main() {
    let rounds = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let c = aqueduct_core::calibrate::measure(rounds);
    println!("{c:?} wake/hop {:.0}", c.wake_to_hop());
}
