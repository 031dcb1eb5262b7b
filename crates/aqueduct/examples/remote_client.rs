//! Submits tasks into a flow that a Python flow server serves (`aqueduct.sockets`), from Rust:
//! `remote_client <socket path> <module> <class> <x>...` sends one task `{x}` per argument to
//! the first step and prints each finished task's `result`, or the error, one line each.

use std::time::Duration;

use aqueduct::RemoteFlow;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug)]
struct Task {
    x: i64,
    result: Option<i64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (path, module, class) = (&args[1], &args[2], &args[3]);
    let flow = match RemoteFlow::connect(path).await {
        Ok(flow) => flow,
        Err(e) => {
            println!("connect failed: {e}");
            std::process::exit(2);
        }
    };
    println!("steps {}", flow.info().step_names.join(","));
    // Every call in flight at once.
    let calls: Vec<_> = args[4..]
        .iter()
        .map(|x| {
            let (flow, module, class) = (flow.clone(), module.clone(), class.clone());
            let task = Task { x: x.parse().expect("an integer"), result: None };
            tokio::spawn(async move { flow.process((&module, &class), 0, &task, Some(Duration::from_secs(20))).await })
        })
        .collect();
    for call in calls {
        match call.await.expect("a call panicked") {
            Ok(task) => println!("result {}", task.result.map_or("none".into(), |r| r.to_string())),
            Err(e) => println!("error {e}"),
        }
    }
}
