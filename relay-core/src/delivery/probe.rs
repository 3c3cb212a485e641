//! Does a destination answer again? Connect, greeting, EHLO, QUIT: what
//! both delivery tiers (the embedded worker, the AWS sweeper and retry
//! function) do to release a domain's queue the moment its primary is back,
//! without sending mail to find out.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client::ReplyParser;
use super::Engine;
use crate::address::DomainName;

impl Engine {
    /// Connect + greeting + EHLO: does the destination answer again? The
    /// error says why not (for the log), from the last address tried.
    pub async fn probe(&self, domain: &DomainName) -> Result<(), String> {
        let targets = self
            .targets_for(domain)
            .await
            .map_err(|e| format!("no route: {e}"))?;
        let mut why = String::from("no address to connect to");
        for target in targets {
            for addr in target.addrs {
                let attempt = tokio::time::timeout(Duration::from_secs(10), async {
                    let mut stream = TcpStream::connect(addr)
                        .await
                        .map_err(|e| format!("{addr}: {e}"))?;
                    let mut parser = ReplyParser::default();
                    let greeting = read_reply(&mut stream, &mut parser)
                        .await
                        .map_err(|e| format!("{addr}: no greeting: {e}"))?;
                    if greeting.code != 220 {
                        return Err(format!("{addr}: greeting {greeting}"));
                    }
                    stream
                        .write_all(format!("EHLO {}\r\n", self.config().me.hostname).as_bytes())
                        .await
                        .map_err(|e| format!("{addr}: {e}"))?;
                    let ehlo = read_reply(&mut stream, &mut parser)
                        .await
                        .map_err(|e| format!("{addr}: no EHLO reply: {e}"))?;
                    let _ = stream.write_all(b"QUIT\r\n").await;
                    if ehlo.code == 250 {
                        Ok(())
                    } else {
                        Err(format!("{addr}: EHLO {ehlo}"))
                    }
                })
                .await;
                match attempt {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => why = e,
                    Err(_) => why = format!("{addr}: timed out"),
                }
            }
        }
        Err(why)
    }
}

/// Reads one SMTP reply from a plain connection (the probe, callouts,
/// `doctor`); the caller bounds the wait.
pub(crate) async fn read_reply<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    parser: &mut ReplyParser,
) -> Result<super::client::Response, String> {
    let mut buf = [0u8; 2048];
    loop {
        match parser.next_reply() {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        parser.feed(&buf[..n]);
    }
}
