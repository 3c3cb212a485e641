#![no_main]
//! Arbitrary server output through the reply parser and the client session:
//! no panic, no endless loop, and every recipient ends with a result.
use libfuzzer_sys::fuzz_target;
use relay_proto::client::{ClientSession, Envelope, Next, ReplyParser};

fuzz_target!(|data: &[u8]| {
    let env = Envelope {
        sender: "a@remote.test".into(),
        recipients: vec!["x@d.test".into(), "y@d.test".into()],
        size: 100,
        smtputf8: data.first().is_some_and(|b| b & 1 == 1),
        eight_bit: true,
        dsn: Default::default(),
        recipient_dsn: Vec::new(),
        tls_request: None,
    };
    // Two messages over one connection: the batch path too.
    let second = Envelope { recipients: vec!["z@d.test".into()], ..env.clone() };
    let mut client = ClientSession::with_messages("mx2.test", true, vec![env, second]);
    let mut parser = ReplyParser::default();
    parser.feed(data);
    for _ in 0..10_000 {
        match client.poll_next() {
            Next::Send(_) | Next::SendBody(_) => {}
            Next::SendChunks(_) => client.chunks_sent(usize::from(data.len() % 3 == 0) + 1),
            Next::StartTls => client.tls_done(data.len() % 2 == 0),
            Next::ReadReply => match parser.next_reply() {
                Ok(Some(r)) => client.on_reply(r),
                Ok(None) | Err(_) => client.connection_lost("eof"),
            },
            Next::Done => {
                let all = client.all_results();
                assert_eq!(all.len(), 2);
                assert_eq!((all[0].len(), all[1].len()), (2, 1));
                return;
            }
        }
    }
    panic!("client session did not finish");
});
