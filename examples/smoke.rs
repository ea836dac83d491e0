use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::*;
fn main() {
    tracing_subscriber::fmt().with_env_filter("debug").init();
    let cfg = Config { syscall_filter: SyscallFilter::No, ..Default::default() };
    let e = Engine::new(cfg).unwrap();
    let t = e.load(std::env::args().nth(1).unwrap(), LoadOptions { workers: 2, log_egress: false }).unwrap();
    let start = std::time::Instant::now();
    for i in 0..2000 {
        let r = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), ExecuteOptions::default()).unwrap().wait();
        if i < 3 { println!("{:?}", r); }
        r.unwrap();
    }
    println!("2000 in {:?}", start.elapsed());
}
