#![forbid(unsafe_code)]
//! A response whose body the handler streams: what the front sends once a request's handler
//! has sent a part (`aqueduct.emit`, or a generator `handle`).
//!
//! The first part carries the status and headers as the handler had set them
//! (`Request._part_state`); each part after it is one chunk of the body, written as it comes
//! (chunked transfer encoding: the length is not known in advance). The final state's body, if
//! any, is the last chunk. A part is taken (its receipt given back, so that the worker may
//! run ahead again) when hyper asks for the next frame: a client that reads slowly holds its
//! worker back through hyper's bounded write buffer and the stream window, and one that stops
//! reading is disconnected after `client_timeout` (the connection's write timeout).
//!
//! A failure after the status has gone out cannot change it. A Server-Sent Events response
//! (`content-type: text/event-stream`) ends with an `event: error` whose data is the JSON error
//! document the front would have answered; any other response is cut short (the connection is
//! closed without the chunked body's end, or reset for an HTTP/1.0 client, whose body the close
//! delimits), which every HTTP client reports as an error. The
//! client hanging up drops the body, which cancels the task in the flow.

use std::collections::VecDeque;
use std::error::Error;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::header::CONTENT_TYPE;
use hyper::{Response, StatusCode};

use super::exchange::{self, error, Body, Failure};
use super::{InFlight, Pending};
use crate::driver::{Native, Outcome};

/// The body of a streamed response.
pub(crate) struct PartBody {
    /// Pieces of a chunk read but not yet sent.
    queued: VecDeque<Bytes>,
    pending: Pending,
    /// Counted against `max_in_flight` until the last chunk is sent.
    counted: Option<InFlight>,
    /// Ends with an `event: error` on a failure, rather than being cut short.
    event_stream: bool,
    ended: bool,
    /// Why the body is to be cut short, at its next poll: hyper closes the connection at once
    /// on a body's error, without writing what it has buffered, so the error waits one poll
    /// (hyper flushes its buffer between two) and the chunks sent before it reach the client.
    cut_short: Option<CutShort>,
    /// For a body the close delimits (HTTP/1.0 has no chunked encoding), the connection's flag
    /// set when the body is cut short: it is reset, not closed, which would end it as complete.
    reset: Option<Arc<AtomicBool>>,
}

/// Why a streamed body was cut short (what hyper logs; the client sees the connection close).
#[derive(Debug)]
pub(crate) struct CutShort(String);

impl fmt::Display for CutShort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the streamed response failed: {}", self.0)
    }
}

impl Error for CutShort {}

/// The response for a call whose first part is `part`: its status and headers, and a body of
/// this part's chunk and the ones to come.
pub(super) fn respond(
    part: Bytes,
    pending: Pending,
    counted: InFlight,
    reset: Option<Arc<AtomicBool>>,
) -> Response<Body> {
    let mut fields = match exchange::read_reply(&part) {
        Ok(fields) if fields.status.is_some() => fields,
        Ok(_) => return bad_part("the first part of a streamed response has no status".into()),
        // `pending` is dropped: the call is cancelled.
        Err(why) => return bad_part(why),
    };
    let event_stream =
        fields.headers.iter().any(|(name, value)| name == CONTENT_TYPE && is_event_stream(value.as_bytes()));
    let queued = std::mem::take(&mut fields.body).into();
    let body = PartBody { queued, pending, counted: Some(counted), event_stream, ended: false, cut_short: None, reset };
    fields.response(Body::Right(body)).unwrap_or_else(bad_part)
}

/// Whether a `content-type` names an event stream (media types are case-insensitive).
fn is_event_stream(content_type: &[u8]) -> bool {
    const EVENT_STREAM: &[u8] = b"text/event-stream";
    content_type.get(..EVENT_STREAM.len()).is_some_and(|t| t.eq_ignore_ascii_case(EVENT_STREAM))
}

fn bad_part(why: String) -> Response<Body> {
    error(StatusCode::INTERNAL_SERVER_ERROR, "bad_reply", &why, None)
}

impl PartBody {
    /// The end of a stream that failed: an error event, or the body cut short.
    fn fail(&mut self, failure: Failure<'_>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, CutShort>>> {
        self.end();
        if self.event_stream {
            return Poll::Ready(Some(Ok(Frame::data(failure.event()))));
        }
        self.cut_short = Some(CutShort(failure.document()));
        if let Some(reset) = &self.reset {
            reset.store(true, Ordering::Release);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn end(&mut self) {
        self.ended = true;
        self.counted = None;
    }
}

impl HttpBody for PartBody {
    type Data = Bytes;
    type Error = CutShort;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, CutShort>>> {
        let this = self.get_mut();
        if let Some(piece) = this.queued.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        if this.ended {
            return Poll::Ready(this.cut_short.take().map(Err));
        }
        loop {
            match std::task::ready!(this.pending.poll_next(cx)) {
                Some(Native::Part(part, receipt)) => {
                    this.pending.taken(receipt);
                    match exchange::read_reply(&part) {
                        Ok(fields) => {
                            // No empty piece is read: an empty frame would end a chunked body.
                            this.queued.extend(fields.body);
                            match this.queued.pop_front() {
                                Some(piece) => return Poll::Ready(Some(Ok(Frame::data(piece)))),
                                None => continue,
                            }
                        }
                        Err(why) => {
                            let failure = Failure {
                                status: StatusCode::INTERNAL_SERVER_ERROR,
                                kind: "bad_reply",
                                message: why,
                                step: None,
                            };
                            return this.fail(failure, cx);
                        }
                    }
                }
                Some(Native::End(Outcome::Done { body, .. })) => {
                    let tail = exchange::read_reply(&Bytes::from(body));
                    this.end();
                    return match tail {
                        Ok(fields) => {
                            this.queued.extend(fields.body);
                            Poll::Ready(this.queued.pop_front().map(|piece| Ok(Frame::data(piece))))
                        }
                        Err(why) => this.fail(
                            Failure {
                                status: StatusCode::INTERNAL_SERVER_ERROR,
                                kind: "bad_reply",
                                message: why,
                                step: None,
                            },
                            cx,
                        ),
                    };
                }
                Some(Native::End(Outcome::Failed { kind, step, detail })) => {
                    let front = this.pending.front.clone();
                    return this.fail(exchange::failure(kind, step, detail, &front.driver.step_names), cx);
                }
                None => {
                    let message = "the flow stopped".to_owned();
                    return this.fail(
                        Failure { status: StatusCode::SERVICE_UNAVAILABLE, kind: "not_running", message, step: None },
                        cx,
                    );
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.queued.is_empty() && self.cut_short.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
