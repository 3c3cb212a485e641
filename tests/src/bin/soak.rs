//! `cargo run -p backupmx-tests --bin soak -- [SESSIONS] [SECONDS]`
//! (default 500 sessions for 300 s): the long soak; prints the report and
//! exits non-zero on a leak or a lost message.

fn main() {
    let mut args = std::env::args().skip(1);
    let sessions = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let seconds = args.next().and_then(|a| a.parse().ok()).unwrap_or(300);
    let report = backupmx_tests::soak::soak(sessions, std::time::Duration::from_secs(seconds));
    println!("{report:#?}");
    let problems = report.problems();
    if problems.is_empty() {
        println!("soak: 1 passed, 0 failed");
    } else {
        for p in &problems {
            eprintln!("soak: {p}");
        }
        println!("soak: 0 passed, 1 failed");
        std::process::exit(1);
    }
}
