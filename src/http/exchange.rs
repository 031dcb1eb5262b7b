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

pub(crate) type Body = Full<Bytes>;

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

/// The response a worker's final state describes: `status`, `reply_headers` (pairs of
/// strings) and `reply_body` (bytes), which `Request._final_state` wrote.
pub(crate) fn reply(state: &[u8]) -> Result<Response<Body>, String> {
    let bad = |m: Malformed| format!("the reply is not readable: {m}");
    if state.first() != Some(&task_state::FORMAT) {
        return Err("the last step's result is not an HTTP reply (was the task's class changed?)".into());
    }
    let (mut r, _, _) = Reader::new(state).map_err(bad)?;
    let mut status = None;
    let mut headers = Vec::new();
    let mut body: &[u8] = b"";
    for _ in 0..r.field_count().map_err(bad)? {
        match r.str().map_err(bad)? {
            "status" => {
                if r.tag(0).map_err(bad)? != task_state::INT {
                    return Err("the reply's status is not an int".into());
                }
                status = Some(r.int().map_err(bad)?);
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
                    headers.push((name, value));
                }
            }
            "reply_body" => {
                if r.tag(0).map_err(bad)? != task_state::BYTES {
                    return Err("the reply's body is not bytes".into());
                }
                body = r.bytes().map_err(bad)?;
            }
            _ => r.skip_value(0).map_err(bad)?,
        }
    }
    r.finished().map_err(bad)?;
    let status = status.ok_or("the reply has no status")?;
    let status = u16::try_from(status)
        .ok()
        // 1xx are not final responses: a handler cannot send one.
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| format!("the response status {status} is not an HTTP status"))?;
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(body)));
    *response.status_mut() = status;
    let map = response.headers_mut();
    for (name, value) in headers {
        map.append(name, value);
    }
    Ok(response)
}

/// A JSON error response: `{"error": kind, "message": ...}` (and the step, when one is concerned).
pub(crate) fn error(status: StatusCode, kind: &str, message: &str, step: Option<&str>) -> Response<Body> {
    let mut doc = serde_json::json!({ "error": kind, "message": message });
    if let Some(step) = step {
        doc["step"] = serde_json::Value::from(step);
    }
    let mut response = Response::new(Full::new(Bytes::from(doc.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // Every 503 here is a passing condition (busy, a worker being replaced, stopping).
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The response for a call's outcome: its reply, or the status its failure maps to. This is
/// the front's one decision about statuses for what happened inside the flow.
pub(crate) fn outcome_response(outcome: Outcome, step_names: &[String]) -> Response<Body> {
    match outcome {
        Outcome::Done { body, .. } => {
            reply(&body).unwrap_or_else(|why| error(StatusCode::INTERNAL_SERVER_ERROR, "bad_reply", &why, None))
        }
        Outcome::Failed { kind, step, detail } => {
            let name = usize::try_from(step).ok().and_then(|s| step_names.get(s)).map(String::as_str);
            let pid = match detail {
                Detail::Pid(pid) => pid,
                _ => 0,
            };
            match (kind, detail) {
                ("handler", Detail::Report(report)) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "handler_error",
                    &aqueduct::remote::remote_error(&report),
                    name,
                ),
                ("died", _) => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "worker_died",
                    &format!("the worker (pid {pid}) handling the request died"),
                    name,
                ),
                ("handler_timeout", _) => error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "handler_timeout",
                    &format!("the handler (pid {pid}) ran past its handle_timeout and was stopped"),
                    name,
                ),
                ("timeout" | "timeout_waiting" | "expired", _) => {
                    error(StatusCode::GATEWAY_TIMEOUT, "timeout", "the request's deadline passed in the flow", name)
                }
                ("shm_exhausted", _) => {
                    error(StatusCode::SERVICE_UNAVAILABLE, "shm_exhausted", "the shared-memory pool is full", name)
                }
                ("stopped" | "not_running", _) => {
                    error(StatusCode::SERVICE_UNAVAILABLE, "not_running", "the flow is stopping", name)
                }
                (other, _) => error(StatusCode::INTERNAL_SERVER_ERROR, other, "the request failed in the flow", name),
            }
        }
    }
}
