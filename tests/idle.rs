//! What an idle peer costs, measured in a process of its own: the CPU this test binary uses is its
//! own test's (the tests of `mesh.rs` run side by side in one process).

use std::time::Duration;

use p2pchat::peer::{self, Event, PeerConfig, Protocol};
use p2pchat::tracker::{Tracker, TrackerConfig};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// CPU time this process has used (user and system), from the kernel.
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// A link whose reader has no timer to wait for costs nothing while nobody speaks: an accepted link
/// that stays silent becomes an original peer's when its opening wait goes off, and from then on its
/// task sleeps until bytes come. (A timer that went off and was kept made that task ready at every
/// poll: a core spent on one idle link.)
#[tokio::test]
async fn an_idle_original_link_uses_no_cpu() {
    let tracker = Tracker::bind(TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let tracker_addr = tracker.local_addr();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tracker.run(async move {
        let _ = stopped.await;
    }));
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker_addr.port());
    config.limits.decide_timeout = Duration::from_millis(100);
    let (ana, mut events, report) = peer::join(config).await.unwrap();
    let _silent = TcpStream::connect(report.listen_addr).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Event::Joined { protocol: Protocol::Original, .. }) = events.recv().await {
                return;
            }
        }
    })
    .await
    .expect("the silent link counts as an original peer");
    let before = process_cpu();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = process_cpu() - before;
    // Idle, the whole process wakes for a keep-alive or two; a spinning task takes the full second.
    assert!(used < Duration::from_millis(300), "an idle room took {used:?} of CPU in 1 s");
    assert_eq!(ana.status().await.unwrap().members, 1);
}
