//! The short soak CI runs: 200 concurrent sessions of mixed traffic for
//! 30 seconds (`cargo run -p backupmx-tests --bin soak` runs the long one).

#[test]
fn thirty_second_soak_keeps_memory_flat_and_loses_nothing() {
    let report = backupmx_tests::soak::soak(200, std::time::Duration::from_secs(30));
    eprintln!("{report:#?}");
    assert!(report.problems().is_empty(), "{:?}", report.problems());
}
