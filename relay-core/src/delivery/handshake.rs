//! The start every short SMTP conversation of ours shares: connect, read
//! the greeting, EHLO, QUIT. The probe (does the primary answer again?),
//! `doctor` (what does the primary offer?) and the container's `health`
//! check all run on it; deliveries and callouts go further with
//! relay-proto's client session ([`super::transport`]).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client::{ReplyParser, Response};

/// Why a short conversation with a hop failed, and at which step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HopError {
    #[error("{addr}: connect: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: timed out waiting for the {step}")]
    Timeout { addr: SocketAddr, step: Step },
    #[error("{addr}: no {step}: {why}")]
    Lost {
        addr: SocketAddr,
        step: Step,
        why: String,
    },
    #[error("{addr}: {step} {reply}")]
    Refused {
        addr: SocketAddr,
        step: Step,
        reply: Response,
    },
}

impl HopError {
    /// Whether the hop answered at all (a refusal, not silence).
    pub fn answered(&self) -> bool {
        matches!(self, HopError::Refused { .. })
    }
}

/// The step of a short conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    Greeting,
    Ehlo,
    Reply,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Connect => "connection",
            Step::Greeting => "greeting",
            Step::Ehlo => "EHLO reply",
            Step::Reply => "reply",
        })
    }
}

/// A connection whose greeting was `220`.
pub struct Greeted {
    addr: SocketAddr,
    stream: TcpStream,
    parser: ReplyParser,
    wait: Duration,
}

impl Greeted {
    /// Connects to `addr`, sends `preface` (a PROXY header, or nothing)
    /// and reads the greeting; each step may take `wait`.
    pub async fn connect(
        addr: SocketAddr,
        preface: &[u8],
        wait: Duration,
    ) -> Result<Greeted, HopError> {
        let stream = match tokio::time::timeout(wait, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(HopError::Connect { addr, source }),
            Err(_) => {
                return Err(HopError::Timeout {
                    addr,
                    step: Step::Connect,
                })
            }
        };
        let mut greeted = Greeted {
            addr,
            stream,
            parser: ReplyParser::default(),
            wait,
        };
        if !preface.is_empty() {
            greeted.send(preface, Step::Greeting).await?;
        }
        let greeting = greeted.reply(Step::Greeting).await?;
        if greeting.code != 220 {
            return Err(HopError::Refused {
                addr,
                step: Step::Greeting,
                reply: greeting,
            });
        }
        Ok(greeted)
    }

    /// `EHLO helo`; its `250` reply (the extensions), or why not.
    pub async fn ehlo(&mut self, helo: &str) -> Result<Response, HopError> {
        let reply = self.command(&format!("EHLO {helo}"), Step::Ehlo).await?;
        if reply.code != 250 {
            return Err(HopError::Refused {
                addr: self.addr,
                step: Step::Ehlo,
                reply,
            });
        }
        Ok(reply)
    }

    /// Sends one command line and reads its reply.
    pub async fn command(&mut self, line: &str, step: Step) -> Result<Response, HopError> {
        self.send(format!("{line}\r\n").as_bytes(), step).await?;
        self.reply(step).await
    }

    /// Says goodbye without waiting for the answer.
    pub async fn quit(mut self) {
        let _ = self.stream.write_all(b"QUIT\r\n").await;
    }

    /// The connection, for what follows (a TLS handshake after STARTTLS).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    async fn send(&mut self, bytes: &[u8], step: Step) -> Result<(), HopError> {
        let addr = self.addr;
        match tokio::time::timeout(self.wait, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(HopError::Lost {
                addr,
                step,
                why: e.to_string(),
            }),
            Err(_) => Err(HopError::Timeout { addr, step }),
        }
    }

    async fn reply(&mut self, step: Step) -> Result<Response, HopError> {
        let addr = self.addr;
        let lost = |why: String| HopError::Lost { addr, step, why };
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut buf = [0u8; 2048];
        loop {
            match self.parser.next_reply() {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(lost(e.to_string())),
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) => return Err(lost("connection closed".into())),
                Ok(Ok(n)) => self.parser.feed(&buf[..n]),
                Ok(Err(e)) => return Err(lost(e.to_string())),
                Err(_) => return Err(HopError::Timeout { addr, step }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server on loopback that writes `script` as it reads lines.
    async fn server(greeting: &'static str, answers: &'static [&'static str]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(greeting.as_bytes()).await.unwrap();
            let mut buf = [0u8; 512];
            for answer in answers {
                if s.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                s.write_all(answer.as_bytes()).await.unwrap();
            }
            let _ = s.read(&mut buf).await;
        });
        addr
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn greeting_then_ehlo_gives_the_extensions() {
        let addr = server(
            "220 mx ESMTP\r\n",
            &["250-mx\r\n250-SIZE 1000\r\n250 STARTTLS\r\n"],
        )
        .await;
        let mut hop = Greeted::connect(addr, b"", WAIT).await.unwrap();
        let ehlo = hop.ehlo("mx2.test").await.unwrap();
        assert_eq!(ehlo.code, 250);
        assert_eq!(ehlo.lines.len(), 3);
        hop.quit().await;
    }

    #[tokio::test]
    async fn a_refused_greeting_or_ehlo_is_an_answer_with_its_step() {
        let addr = server("554 5.7.1 go away\r\n", &[]).await;
        let err = Greeted::connect(addr, b"", WAIT).await.err().unwrap();
        assert!(err.answered());
        assert!(
            matches!(
                err,
                HopError::Refused {
                    step: Step::Greeting,
                    ..
                }
            ),
            "{err}"
        );
        let addr = server("220 mx\r\n", &["502 5.5.1 no EHLO\r\n"]).await;
        let mut hop = Greeted::connect(addr, b"", WAIT).await.unwrap();
        let err = hop.ehlo("mx2.test").await.err().unwrap();
        assert!(
            matches!(
                err,
                HopError::Refused {
                    step: Step::Ehlo,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("EHLO reply 502"), "{err}");
    }

    #[tokio::test]
    async fn silence_and_a_closed_port_are_not_answers() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = Greeted::connect(closed, b"", WAIT).await.err().unwrap();
        assert!(matches!(err, HopError::Connect { .. }), "{err}");
        assert!(!err.answered());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move { listener.accept().await });
        let err = Greeted::connect(addr, b"", Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                HopError::Timeout {
                    step: Step::Greeting,
                    ..
                }
            ),
            "{err}"
        );
    }
}
