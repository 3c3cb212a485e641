//! SMTP server side: grammar, replies, DATA framing and the session.

pub mod command;
pub mod data;
pub mod reply;
pub mod session;

pub use reply::Reply;
pub use session::{Action, RcptVerdict, Rejection, Session, SessionConfig};
