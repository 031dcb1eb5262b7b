//! Thread-mode flows end to end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aqueduct::{from_fn, BoxError, Flow, FlowError, FlowStep, Handler, ProcessOptions};

#[derive(Debug, Default)]
struct Task {
    x: u64,
    doubled: Option<u64>,
    plus_one: Option<u64>,
    sleep_ms: u64,
    payload: Option<Box<[u8]>>,
}

fn task(x: u64) -> Task {
    Task { x, ..Task::default() }
}

/// Doubles `x`; sleeps `sleep_ms`; records the largest batch it saw; panics on 13; fails on 7.
#[derive(Clone, Default)]
struct Double {
    largest_batch: Arc<AtomicUsize>,
}

impl Handler<Task> for Double {
    fn handle(&mut self, batch: &mut [Task]) -> Result<(), BoxError> {
        self.largest_batch.fetch_max(batch.len(), Ordering::Relaxed);
        let sleep = batch.iter().map(|t| t.sleep_ms).max().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(sleep));
        for t in batch.iter_mut() {
            match t.x {
                13 => panic!("thirteen is unlucky"),
                7 => return Err("seven is not allowed".into()),
                x => t.doubled = Some(x * 2),
            }
        }
        Ok(())
    }
}

fn plus_one() -> FlowStep<Task> {
    FlowStep::new(from_fn(|batch: &mut [Task]| {
        for t in batch.iter_mut() {
            t.plus_one = Some(t.doubled.unwrap_or(t.x) + 1);
        }
        Ok(())
    }))
}

/// Every test runs under a deadline: a bug here hangs rather than fails.
async fn within(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(30), test).await.expect("the test timed out");
}

async fn start(steps: Vec<FlowStep<Task>>) -> Flow<Task> {
    let mut builder = Flow::builder("test");
    for s in steps {
        builder = builder.step(s);
    }
    builder.start().await.expect("the flow starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_go_through_the_steps_their_conditions_pick() {
    within(async {
        let flow =
            start(vec![FlowStep::new(Double::default()), plus_one().handle_condition(|t: &Task| t.x % 2 == 0)]).await;
        for x in [0u64, 1, 2, 3, 4, 5, 6, 8, 9, 10] {
            let done = flow.process(task(x)).await.unwrap();
            assert_eq!(done.doubled, Some(x * 2));
            assert_eq!(done.plus_one, (x % 2 == 0).then_some(x * 2 + 1), "x = {x}");
        }
        // A task no step takes comes straight back.
        let flow2 = start(vec![FlowStep::new(Double::default()).handle_condition(|t: &Task| t.x > 100)]).await;
        assert_eq!(flow2.process(task(1)).await.unwrap().doubled, None);
        flow.stop().await;
        flow2.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_timeout_gathers_tasks_that_arrive_within_it() {
    within(async {
        let double = Double::default();
        let largest = double.largest_batch.clone();
        let step = FlowStep::new(double).batch_size(8).batch_timeout(Duration::from_millis(500));
        let flow = start(vec![step]).await;
        let first = tokio::spawn({
            let flow = flow.clone();
            async move { flow.process(task(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await; // the scenario: two more arrive later
        let (a, b) = tokio::join!(flow.process(task(2)), flow.process(task(3)));
        assert_eq!(first.await.unwrap().unwrap().doubled, Some(2));
        assert_eq!((a.unwrap().doubled, b.unwrap().doubled), (Some(4), Some(6)));
        assert_eq!(largest.load(Ordering::Relaxed), 3, "one batch of three, not full, within the timeout");
        flow.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_batches_fill_up_to_batch_size() {
    within(async {
        let double = Double::default();
        let largest = double.largest_batch.clone();
        let flow = start(vec![FlowStep::new(double).batch_size(8).nprocs(2)]).await;
        let calls: Vec<_> = (0..200u64)
            .map(|x| {
                let flow = flow.clone();
                tokio::spawn(async move { flow.process(Task { x: x + 100, sleep_ms: 2, ..Task::default() }).await })
            })
            .collect();
        for (x, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap().doubled, Some((x as u64 + 100) * 2));
        }
        assert_eq!(largest.load(Ordering::Relaxed), 8, "full batches, never more than batch_size");
        let metrics = flow.metrics().await.unwrap();
        assert_eq!(metrics.steps[0].stats.tasks, 200);
        flow.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_or_an_error_fails_only_its_batch_and_the_flow_keeps_serving() {
    within(async {
        let flow = start(vec![FlowStep::new(Double::default())]).await;
        match flow.process(task(13)).await {
            Err(FlowError::Handler { step, message }) => {
                assert_eq!(step, "step1_Double");
                assert!(message.contains("thirteen is unlucky"), "{message}");
            }
            other => panic!("expected a handler error, got {other:?}"),
        }
        match flow.process(task(7)).await {
            Err(FlowError::Handler { message, .. }) => assert_eq!(message, "seven is not allowed"),
            other => panic!("expected a handler error, got {other:?}"),
        }
        assert_eq!(flow.process(task(4)).await.unwrap().doubled, Some(8));
        flow.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_move_without_being_copied() {
    within(async {
        let flow = start(vec![FlowStep::new(Double::default()), plus_one()]).await;
        let payload: Box<[u8]> = vec![7u8; 1 << 20].into_boxed_slice();
        let address = payload.as_ptr();
        let done = flow.process(Task { x: 1, payload: Some(payload), ..Task::default() }).await.unwrap();
        assert_eq!(done.payload.as_ref().unwrap().as_ptr(), address, "the same allocation came back");
        flow.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_gives_up_on_the_task_and_the_flow_carries_on() {
    within(async {
        let flow = start(vec![FlowStep::new(Double::default())]).await;
        let slow = Task { x: 1, sleep_ms: 300, ..Task::default() };
        let options = ProcessOptions { timeout: Some(Duration::from_millis(30)), ..ProcessOptions::default() };
        assert_eq!(flow.process_with(slow, options).await.unwrap_err(), FlowError::Timeout);
        // A caller that drops its call (a cancelled request) gives the task up as well.
        let dropped = tokio::time::timeout(
            Duration::from_millis(20),
            flow.process(Task { x: 2, sleep_ms: 100, ..Task::default() }),
        );
        assert!(dropped.await.is_err());
        assert_eq!(flow.process(task(3)).await.unwrap().doubled, Some(6));
        flow.stop().await;
    })
    .await;
}

/// Holds the first task (x == 0) until released, announcing that it has it; records the order
/// in which tasks are handled.
#[derive(Clone)]
struct Gate {
    started: Arc<tokio::sync::Notify>,
    release: Arc<(Mutex<bool>, std::sync::Condvar)>,
    order: Arc<Mutex<Vec<u64>>>,
}

impl Gate {
    fn new() -> Self {
        Self {
            started: Arc::new(tokio::sync::Notify::new()),
            release: Arc::new((Mutex::new(false), std::sync::Condvar::new())),
            order: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn open(&self) {
        *self.release.0.lock().unwrap() = true;
        self.release.1.notify_all();
    }
}

impl Handler<Task> for Gate {
    fn handle(&mut self, batch: &mut [Task]) -> Result<(), BoxError> {
        for t in batch.iter_mut() {
            if t.x == 0 {
                self.started.notify_one();
                let (open, changed) = &*self.release;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = changed.wait(open).unwrap();
                }
            }
            self.order.lock().unwrap().push(t.x);
            t.doubled = Some(t.x * 2);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_thread_that_panics_outside_the_handler_fails_its_tasks_and_is_replaced() {
    within(async {
        // The second step's condition runs in the first step's worker, after its handler:
        // a panic there ends the thread itself.
        let flow = start(vec![
            FlowStep::new(Double::default()),
            plus_one().handle_condition(|t: &Task| if t.x == 21 { panic!("no 21") } else { true }),
        ])
        .await;
        assert!(matches!(flow.process(task(21)).await, Err(FlowError::WorkerDied { .. })));
        let done = flow.process(task(2)).await.unwrap();
        assert_eq!((done.doubled, done.plus_one), (Some(4), Some(5)), "a replacement thread serves");
        flow.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_step_never_holds_back_the_calls_of_another() {
    within(async {
        // Step 1 (x < 100) is held by a gate with room for one task; step 2 takes the rest.
        let gate = Gate::new();
        let flow = Flow::builder("no-head-of-line")
            .step(FlowStep::new(gate.clone()).handle_condition(|t: &Task| t.x < 100))
            .step(plus_one().handle_condition(|t: &Task| t.x >= 100))
            .queue_size(1)
            .start()
            .await
            .unwrap();
        let mut held = Vec::new();
        for x in [0, 1, 2, 3] {
            let flow = flow.clone();
            held.push(tokio::spawn(async move { flow.process(task(x)).await }));
        }
        gate.started.notified().await;
        // Step 1 is full and two of its calls wait for room; step 2's call goes through.
        let other = flow.process(task(100)).await.unwrap();
        assert_eq!(other.plus_one, Some(101));
        gate.open();
        for call in held {
            call.await.unwrap().unwrap();
        }
        flow.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priorities_are_served_first() {
    within(async {
        let gate = Gate::new();
        let flow = Flow::builder("prio").step(FlowStep::new(gate.clone())).queue_priorities(2).start().await.unwrap();
        // The first task holds the worker while the others queue up.
        let blocker = tokio::spawn({
            let flow = flow.clone();
            async move { flow.process(task(0)).await }
        });
        gate.started.notified().await;
        let mut calls = Vec::new();
        for (x, priority) in [(1, 0u8), (2, 0), (3, 1), (4, 1)] {
            let flow = flow.clone();
            calls.push(tokio::spawn(async move {
                flow.process_with(task(x), ProcessOptions { priority, timeout: None }).await
            }));
        }
        // The driver answers requests in order: once it reports four queued, they all are.
        while flow.metrics().await.unwrap().steps[0].queue_len < 4 {
            tokio::task::yield_now().await;
        }
        gate.open();
        blocker.await.unwrap().unwrap();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        let order = gate.order.lock().unwrap().clone();
        assert_eq!(order[0], 0);
        let set = |s: &[u64]| s.iter().copied().collect::<std::collections::HashSet<_>>();
        assert_eq!(set(&order[1..3]), set(&[3, 4]), "the urgent ones first: {order:?}");
        assert_eq!(set(&order[3..]), set(&[1, 2]));
        assert_eq!(
            flow.process_with(task(5), ProcessOptions { priority: 2, timeout: None }).await.unwrap_err(),
            FlowError::Invalid("priority must be below queue_priorities (2), got 2".into())
        );
        flow.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_lets_tasks_in_flight_finish_then_refuses_new_ones() {
    within(async {
        let gate = Gate::new();
        let flow = Flow::builder("stop").step(FlowStep::new(gate.clone())).start().await.unwrap();
        let in_flight = tokio::spawn({
            let flow = flow.clone();
            async move { flow.process(task(0)).await }
        });
        gate.started.notified().await;
        let stopping = tokio::spawn({
            let flow = flow.clone();
            async move { flow.stop().await }
        });
        flow.stopped().await;
        assert_eq!(flow.process(task(1)).await.unwrap_err(), FlowError::NotRunning, "refused while stopping");
        gate.open();
        assert_eq!(in_flight.await.unwrap().unwrap().doubled, Some(0), "the task in flight finished");
        stopping.await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_on_start_fails_the_start() {
    within(async {
        #[derive(Clone)]
        struct NoModel;
        impl Handler<Task> for NoModel {
            fn on_start(&mut self) -> Result<(), BoxError> {
                Err("model file not found".into())
            }
            fn handle(&mut self, _: &mut [Task]) -> Result<(), BoxError> {
                Ok(())
            }
        }
        let started = Flow::builder("broken").step(FlowStep::new(NoModel)).start().await;
        match started {
            Err(FlowError::Start(message)) => assert!(message.contains("model file not found"), "{message}"),
            Err(other) => panic!("expected a start error, got {other:?}"),
            Ok(_) => panic!("a flow whose on_start fails must not start"),
        }
        let empty = Flow::<Task>::builder("empty").start().await;
        assert!(matches!(empty, Err(FlowError::Invalid(_))));
    })
    .await;
}

/// Streams `x` parts per task, `"{x}:{n}"`, round-robin over its batch; records how many it
/// sent after its callers left (`send` returned `false`), and fails a task with x == 7 after
/// its third part.
#[derive(Clone, Default)]
struct Count {
    refused: Arc<AtomicUsize>,
}

impl Handler<Task> for Count {
    fn handle(&mut self, batch: &mut [Task]) -> Result<(), BoxError> {
        self.handle_streaming(batch, &mut aqueduct::Parts::discarding())
    }

    fn handle_streaming(&mut self, batch: &mut [Task], parts: &mut aqueduct::Parts<'_>) -> Result<(), BoxError> {
        let longest = batch.iter().map(|t| t.x).max().unwrap_or(0);
        for n in 0..longest {
            for (i, t) in batch.iter().enumerate() {
                if n >= t.x {
                    continue;
                }
                if t.x == 7 && n == 3 {
                    return Err("seven fails after three parts".into());
                }
                if !parts.send(i, format!("{}:{n}", t.x).as_bytes())? {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
        for t in batch.iter_mut() {
            t.doubled = Some(t.x * 2);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_hands_out_the_parts_in_order_then_the_task() {
    within(async {
        let count = Count::default();
        let refused = count.refused.clone();
        let flow = start(vec![FlowStep::new(count).batch_size(4).batch_timeout(Duration::from_millis(20))]).await;
        // More parts than the window: the reader's takes let the worker go on. Read as the
        // worker sends, round-robin: one stream left unread would hold back its whole batch.
        let mut streams: Vec<_> =
            [30u64, 31, 32].iter().map(|&x| flow.stream(task(x), ProcessOptions::default()).unwrap()).collect();
        for n in 0..32 {
            for (stream, x) in streams.iter_mut().zip([30u64, 31, 32]) {
                if n < x {
                    assert_eq!(stream.next_part().await.unwrap(), format!("{x}:{n}").into_bytes());
                }
            }
        }
        for stream in &mut streams {
            assert_eq!(stream.next_part().await, None);
        }
        for (stream, x) in streams.into_iter().zip([30u64, 31, 32]) {
            assert_eq!(stream.finish().await.unwrap().doubled, Some(x * 2));
        }
        // process() of the streaming step: the parts are dropped, the result comes.
        assert_eq!(flow.process(task(40)).await.unwrap().doubled, Some(80));
        // A handler error after parts: the parts first, then the error.
        let mut failing = flow.stream(task(7), ProcessOptions::default()).unwrap();
        for n in 0..3 {
            assert_eq!(failing.next_part().await.unwrap(), format!("7:{n}").into_bytes());
        }
        assert!(matches!(failing.finish().await, Err(FlowError::Handler { .. })));
        // Dropping a stream cancels its task: the handler's next send says so.
        let mut endless = flow.stream(task(1_000_000), ProcessOptions::default()).unwrap();
        assert_eq!(endless.next_part().await.unwrap(), b"1000000:0".to_vec());
        drop(endless);
        assert_eq!(flow.process(task(2)).await.unwrap().doubled, Some(4), "the worker is free again");
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        // The deadline covers the stream.
        let options = ProcessOptions { timeout: Some(Duration::from_millis(300)), priority: 0 };
        let mut slow = flow.stream(task(1_000_000), options).unwrap();
        while slow.next_part().await.is_some() {}
        assert!(matches!(slow.finish().await, Err(FlowError::Timeout)));
        flow.stop().await;
    })
    .await;
}
