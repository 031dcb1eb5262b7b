#![forbid(unsafe_code)]
//! What an HTTP exchange is on the engine's side: a request written as the state of a task of
//! `aqueduct.http.Request`, a reply read back from the state the last step's worker wrote
//! (`Request._final_state`), and the one mapping from a call's failure to an HTTP status.
//!
//! Both directions use the compact wire form (`aqueduct_core::task_state`): the request is
//! built without Python, and the reply is read without unpickling anything.

use aqueduct_core::task_state::{self, Malformed, Reader, TooLong, Writer};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{HeaderMap, Response, StatusCode};

use crate::driver::{Detail, Outcome};

/// The task class every request becomes (`python/aqueduct/http.py`).
pub(crate) const REQUEST_MODULE: &str = "aqueduct.http";
pub(crate) const REQUEST_CLASS: &str = "Request";

/// A response body: whole, or streamed by the handler (`super::streamed`).
pub(crate) type Body = http_body_util::Either<Full<Bytes>, super::streamed::PartBody>;

/// The request's fields, as `Request` documents them, with the response fields' defaults.
pub(crate) struct RequestParts<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// `expiration_time`: seconds on the monotonic clock (Python's `time.monotonic()`).
    pub expires_at: f64,
}

/// The request as a compact task body.
pub(crate) fn encode_request(r: &RequestParts<'_>) -> Result<Vec<u8>, TooLong> {
    use task_state::{BYTES, DICT, NONE, STR};
    let mut w = Writer::new(REQUEST_MODULE, REQUEST_CLASS, 11)?;
    let id = aqueduct_core::ids::uuid4();
    let id = std::str::from_utf8(&id).expect("a UUID string is ASCII");
    for (name, value) in [("task_id", id), ("method", r.method), ("path", r.path), ("query", r.query)] {
        w.str(name)?;
        w.tag(STR);
        w.str(value)?;
    }
    w.str("priority")?;
    w.int(0); // `int` and `float` write their tags
    w.str("expiration_time")?;
    w.float(r.expires_at);
    // One entry per name (lower case, as HTTP/2 and hyper give them), repeated fields joined
    // with ", " as RFC 9110 allows; values that are not UTF-8 read as Latin-1, as WSGI does.
    w.str("headers")?;
    w.tag(DICT);
    w.len(r.headers.keys_len())?;
    for name in r.headers.keys() {
        w.tag(STR);
        w.str(name.as_str())?;
        let mut joined = String::new();
        for (i, value) in r.headers.get_all(name).iter().enumerate() {
            if i > 0 {
                joined.push_str(", ");
            }
            match value.to_str() {
                Ok(text) => joined.push_str(text),
                Err(_) => joined.extend(value.as_bytes().iter().map(|&b| b as char)),
            }
        }
        w.tag(STR);
        w.str(&joined)?;
    }
    w.str("body")?;
    w.tag(BYTES);
    w.bytes(r.body)?;
    w.str("status")?;
    w.int(200);
    w.str("response_headers")?;
    w.tag(DICT);
    w.len(0)?;
    w.str("response")?;
    w.tag(NONE);
    Ok(w.finish())
}

/// Response headers that decide how the body is framed on the connection: a handler setting
/// one could desynchronise keep-alive connections (a wrong `content-length`), so they are
/// refused; hyper writes them itself.
const FRAMING: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

/// What a worker wrote of a reply, in the compact wire form: its final state
/// (`Request._final_state`: `status`, `reply_headers`, `reply_body`) or a part of a streamed
/// response (`Request._part_state`: the first part has the status and headers too, the others
/// only a `reply_body` chunk).
pub(crate) struct ReplyFields {
    pub status: Option<StatusCode>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body, or a part's chunk, in pieces to write one after the other (`bytes`, or a list
    /// of `bytes` and `str`: an event's fields and its data); each a slice of the state it
    /// was read from, none empty.
    pub body: Vec<Bytes>,
}

impl ReplyFields {
    /// A response with these status and headers (the status is required) and `body`.
    pub(crate) fn response<B>(self, body: B) -> Result<Response<B>, String> {
        let mut response = Response::new(body);
        *response.status_mut() = self.status.ok_or("the reply has no status")?;
        let map = response.headers_mut();
        for (name, value) in self.headers {
            map.append(name, value);
        }
        Ok(response)
    }
}

/// Reads a reply's fields (see [`ReplyFields`]), checking what HTTP needs: a final status (200
/// to 599), valid header names and values, none of the headers that frame the body.
pub(crate) fn read_reply(state: &Bytes) -> Result<ReplyFields, String> {
    let bad = |m: Malformed| format!("the reply is not readable: {m}");
    if state.first() != Some(&task_state::FORMAT) {
        return Err("the last step's result is not an HTTP reply (was the task's class changed?)".into());
    }
    let (mut r, _, _) = Reader::new(state).map_err(bad)?;
    let mut fields = ReplyFields { status: None, headers: Vec::new(), body: Vec::new() };
    for _ in 0..r.field_count().map_err(bad)? {
        match r.str().map_err(bad)? {
            "status" => {
                if r.tag(0).map_err(bad)? != task_state::INT {
                    return Err("the reply's status is not an int".into());
                }
                let status = r.int().map_err(bad)?;
                let checked = u16::try_from(status)
                    .ok()
                    // 1xx are not final responses: a handler cannot send one.
                    .filter(|s| (200..=599).contains(s))
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .ok_or_else(|| format!("the response status {status} is not an HTTP status"))?;
                fields.status = Some(checked);
            }
            "reply_headers" => {
                if !matches!(r.tag(0).map_err(bad)?, task_state::LIST | task_state::TUPLE) {
                    return Err("the reply's headers are not a list".into());
                }
                for _ in 0..r.sequence_len().map_err(bad)? {
                    let pair = r.tag(1).map_err(bad)?;
                    if !matches!(pair, task_state::TUPLE | task_state::LIST) || r.sequence_len().map_err(bad)? != 2 {
                        return Err("a reply header is not a (name, value) pair".into());
                    }
                    let mut text = || -> Result<&str, String> {
                        if r.tag(2).map_err(bad)? != task_state::STR {
                            return Err("a reply header's name or value is not a str".into());
                        }
                        r.str().map_err(bad)
                    };
                    let (name, value) = (text()?, text()?);
                    let name = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("the response header name {name:?} is not valid HTTP"))?;
                    if FRAMING.contains(&name.as_str()) {
                        return Err(format!("the response header {name} is the front's to set (it frames the body)"));
                    }
                    let value = HeaderValue::from_str(value)
                        .map_err(|_| format!("the value of response header {name} is not valid HTTP"))?;
                    fields.headers.push((name, value));
                }
            }
            "reply_body" => {
                let mut piece = |r: &mut Reader<'_>, tag: u8| -> Result<(), String> {
                    let raw = match tag {
                        task_state::BYTES => r.bytes().map_err(bad)?,
                        task_state::STR => r.str().map_err(bad)?.as_bytes(),
                        _ => return Err("a piece of the reply's body is not bytes or str".into()),
                    };
                    if !raw.is_empty() {
                        fields.body.push(state.slice_ref(raw));
                    }
                    Ok(())
                };
                match r.tag(0).map_err(bad)? {
                    task_state::BYTES => piece(&mut r, task_state::BYTES)?,
                    task_state::LIST => {
                        for _ in 0..r.sequence_len().map_err(bad)? {
                            let tag = r.tag(1).map_err(bad)?;
                            piece(&mut r, tag)?;
                        }
                    }
                    _ => return Err("the reply's body is not bytes".into()),
                }
            }
            _ => r.skip_value(0).map_err(bad)?,
        }
    }
    r.finished().map_err(bad)?;
    Ok(fields)
}

/// The response a worker's final state describes.
pub(crate) fn reply(state: Bytes) -> Result<Response<Body>, String> {
    let mut fields = read_reply(&state)?;
    let body = match std::mem::take(&mut fields.body).as_slice() {
        [] => Bytes::new(),
        [one] => one.clone(),
        pieces => Bytes::from(pieces.concat()),
    };
    fields.response(Body::Left(Full::new(body)))
}

/// Why a call failed, as the front tells its client: a status, a kind and a message (and the
/// step, when one is concerned). This is the front's one decision about statuses for what
/// happened inside the flow.
pub(crate) struct Failure<'a> {
    pub status: StatusCode,
    pub kind: &'a str,
    pub message: String,
    pub step: Option<&'a str>,
}

impl Failure<'_> {
    /// `{"error": kind, "message": ..., "step": ...}`.
    pub(crate) fn document(&self) -> String {
        let mut doc = serde_json::json!({ "error": self.kind, "message": self.message });
        if let Some(step) = self.step {
            doc["step"] = serde_json::Value::from(step);
        }
        doc.to_string()
    }

    /// The failure as a JSON error response.
    pub(crate) fn response(&self) -> Response<Body> {
        let mut response = Response::new(Body::Left(Full::new(Bytes::from(self.document()))));
        *response.status_mut() = self.status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 here is a passing condition (busy, a worker being replaced, stopping).
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    /// The failure as the last event of a Server-Sent Events stream (`event: error`), for a
    /// response whose status has been sent already.
    pub(crate) fn event(&self) -> Bytes {
        Bytes::from(format!("event: error\ndata: {}\n\n", self.document()))
    }
}

/// A JSON error response: `{"error": kind, "message": ...}` (and the step, when one is concerned).
pub(crate) fn error(status: StatusCode, kind: &str, message: &str, step: Option<&str>) -> Response<Body> {
    Failure { status, kind, message: message.to_owned(), step }.response()
}

/// How a failed call is told to its client.
pub(crate) fn failure<'a>(kind: &'a str, step: i64, detail: Detail, step_names: &'a [String]) -> Failure<'a> {
    let step = usize::try_from(step).ok().and_then(|s| step_names.get(s)).map(String::as_str);
    let pid = match detail {
        Detail::Pid(pid) => pid,
        _ => 0,
    };
    let (status, kind, message) = match (kind, detail) {
        ("handler", Detail::Report(report)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "handler_error", aqueduct::remote::remote_error(&report))
        }
        ("died", _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "worker_died",
            format!("the worker (pid {pid}) handling the request died"),
        ),
        ("handler_timeout", _) => (
            StatusCode::GATEWAY_TIMEOUT,
            "handler_timeout",
            format!("the handler (pid {pid}) ran past its handle_timeout and was stopped"),
        ),
        ("timeout" | "timeout_waiting" | "expired", _) => {
            (StatusCode::GATEWAY_TIMEOUT, "timeout", "the request's deadline passed in the flow".into())
        }
        ("idle_timeout", _) => (
            StatusCode::GATEWAY_TIMEOUT,
            "idle_timeout",
            "the response waited longer than idle_timeout_sec for its next part".into(),
        ),
        ("shm_exhausted", _) => {
            (StatusCode::SERVICE_UNAVAILABLE, "shm_exhausted", "the shared-memory pool is full".into())
        }
        ("stopped" | "not_running", _) => {
            (StatusCode::SERVICE_UNAVAILABLE, "not_running", "the flow is stopping".into())
        }
        (other, _) => (StatusCode::INTERNAL_SERVER_ERROR, other, "the request failed in the flow".into()),
    };
    Failure { status, kind, message, step }
}

/// The response for a call's outcome that came without parts: its reply, or its failure.
pub(crate) fn outcome_response(outcome: Outcome, step_names: &[String]) -> Response<Body> {
    match outcome {
        Outcome::Done { body, .. } => reply(Bytes::from(body))
            .unwrap_or_else(|why| error(StatusCode::INTERNAL_SERVER_ERROR, "bad_reply", &why, None)),
        Outcome::Failed { kind, step, detail } => failure(kind, step, detail, step_names).response(),
    }
}
