//! What the error types of the core share.

use std::fmt;

/// Any error kept as the source of one of ours.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shows an error with all its sources, `outer: inner: innermost`, for logs:
/// our error types name what failed and keep the cause as their source
/// (the cause's text is not repeated in their own), so a log line that
/// showed only the outer error would lose why.
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'a));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_report_shows_every_source_once() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(Report(&e).to_string(), "outer: disk on fire");
    }
}
