//! Overlapping pure-Rust work with PostgreSQL's own: a pipeline whose middle stage runs on one
//! helper thread.
//!
//! A backend is single-threaded as far as PostgreSQL is concerned, so the helper must never call
//! into PostgreSQL (no palloc, no elog, no SPI): it only ever sees owned Rust values. It is
//! started with every signal blocked, so PostgreSQL's handlers (cancel, terminate, latch) keep
//! running on the backend's own thread, and it is always joined before `pipeline` returns or
//! unwinds, so no thread outlives the call, even when a PostgreSQL error unwinds the backend's
//! stages.

use std::ops::ControlFlow;
use std::sync::mpsc::sync_channel;

/// Batches kept in flight: one being worked on by the helper while the backend consumes the
/// previous one and produces the next.
const IN_FLIGHT: usize = 2;

/// Runs `produce` and `consume` on the calling (backend) thread and `work` on a helper thread:
/// `produce` yields inputs until `None`; each goes through `work`, and `consume` receives the
/// results in the order the inputs came, while the helper already works on the next input.
/// The helper owns `work` (clone what it needs from the backend's data: it cannot borrow what
/// is not `Sync`). `consume` may stop the pipeline early with `ControlFlow::Break`, whose value is returned.
pub fn pipeline<I, O, B>(
    mut produce: impl FnMut() -> Option<I>,
    mut work: impl FnMut(I) -> O + Send,
    mut consume: impl FnMut(O) -> ControlFlow<B>,
) -> Option<B>
where
    I: Send,
    O: Send,
{
    std::thread::scope(|scope| {
        let (to_helper, inputs) = sync_channel::<I>(IN_FLIGHT);
        let (to_backend, outputs) = sync_channel::<O>(IN_FLIGHT);
        let helper = with_signals_blocked(|| {
            scope.spawn(move || {
                for input in inputs {
                    if to_backend.send(work(input)).is_err() {
                        break;
                    }
                }
            })
        });
        // Dropping either channel end (also while unwinding from a PostgreSQL error) makes the
        // helper's next receive or send fail, so it stops and the scope can join it.
        let mut to_helper = Some(to_helper);
        let mut pending = 0usize;
        let mut stopped = None;
        loop {
            while pending < IN_FLIGHT {
                let Some(tx) = &to_helper else { break };
                match produce() {
                    Some(input) => {
                        if tx.send(input).is_err() {
                            break; // the helper panicked: join below reports it
                        }
                        pending += 1;
                    }
                    None => to_helper = None,
                }
            }
            if pending == 0 {
                break;
            }
            let Ok(output) = outputs.recv() else {
                break; // the helper panicked
            };
            pending -= 1;
            if let ControlFlow::Break(value) = consume(output) {
                stopped = Some(value);
                break;
            }
        }
        drop(to_helper);
        drop(outputs);
        if let Err(panic) = helper.join() {
            std::panic::resume_unwind(panic);
        }
        stopped
    })
}

/// Runs `f` (which starts a thread) with every signal blocked on the calling thread, so that the
/// new thread inherits a mask that blocks them all; the caller's mask is restored afterwards.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: plain POSIX calls on locally owned signal sets.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_input_order_and_all_inputs_are_worked() {
        let mut next = 0;
        let mut seen = Vec::new();
        let stopped: Option<()> = pipeline(
            || {
                next += 1;
                (next <= 100).then_some(next)
            },
            |i: i32| i * 2,
            |o| {
                seen.push(o);
                ControlFlow::Continue(())
            },
        );
        assert_eq!(stopped, None);
        assert_eq!(seen, (1..=100).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn consume_can_stop_early_and_the_helper_is_joined() {
        let mut next = 0;
        let stopped = pipeline(
            || {
                next += 1;
                Some(next)
            },
            |i: i32| i,
            |o| if o == 7 { ControlFlow::Break(o) } else { ControlFlow::Continue(()) },
        );
        assert_eq!(stopped, Some(7));
        assert!(next >= 7 && next <= 7 + IN_FLIGHT as i32 + 1, "produced {next}");
    }

    #[test]
    fn a_panic_in_the_helper_reaches_the_caller() {
        let result = std::panic::catch_unwind(|| {
            let mut next = 0;
            pipeline(
                || {
                    next += 1;
                    (next <= 10).then_some(next)
                },
                |i: i32| if i == 3 { panic!("boom") } else { i },
                |_| ControlFlow::<()>::Continue(()),
            )
        });
        assert!(result.is_err());
    }

    #[test]
    fn a_panic_in_consume_joins_the_helper_and_unwinds() {
        let result = std::panic::catch_unwind(|| {
            let mut next = 0;
            pipeline(
                || {
                    next += 1;
                    Some(next)
                },
                |i: i32| i,
                |o| if o == 5 { panic!("consumer failed") } else { ControlFlow::<()>::Continue(()) },
            )
        });
        assert!(result.is_err());
    }
}
