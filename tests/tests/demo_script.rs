//! `scripts/run-demo.sh` (what `make run` starts) survives the rate-limit service dying: the
//! script is run as a user would, on ephemeral ports (its `DEMO_*` variables), the service
//! it started is SIGKILLed, and then: Envoy stays up, repair (protected) is served and export
//! (`closed`) answers 503 while the service is down, the script reports the exit, starts the
//! service again, and decisions are central again. Bounded: about a minute at most.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use laneguard_tests::config::{self, DemoPorts};
use laneguard_tests::envoy::envoy_command;
use laneguard_tests::{demo_config, repo_root, tail, token, Client, RunDir};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The script, stopped with SIGTERM (its trap stops what it started) when dropped.
struct Demo {
    child: Child,
    log: std::path::PathBuf,
}

impl Demo {
    fn logs(&self) -> String {
        tail(&self.log, 40)
    }

    fn stop(&mut self) -> bool {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
    }
}

fn service_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("service.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Poll `f` every 100 ms until it is true, for at most `within`.
fn until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn demo_reports_a_dead_service_and_restarts_it_while_envoy_stays_up() {
    let dir = RunDir::new("demo-script").unwrap();
    let (gateway, admin, service, upstream, metrics) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let mut cfg = demo_config().unwrap();
    config::rewrite_demo(&mut cfg, &DemoPorts { service, upstream }).unwrap();
    config::set_admin_port(&mut cfg, admin).unwrap();
    config::set_all_listener_ports(&mut cfg, gateway).unwrap();
    let cfg_path = dir.file("demo-envoy.yaml");
    std::fs::write(&cfg_path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let run_dir = dir.file("run");
    let log = dir.file("run-demo.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(repo_root().join("scripts/run-demo.sh"))
        .env("ENVOY", envoy_command().unwrap().join(" "))
        .env("DEMO_RUN_DIR", &run_dir)
        .env("DEMO_ENVOY_CONFIG", &cfg_path)
        .env("DEMO_SERVICE_ADDR", format!("127.0.0.1:{service}"))
        .env("DEMO_UPSTREAM_ADDR", format!("127.0.0.1:{upstream}"))
        .env("DEMO_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .env("DEMO_GATEWAY_PORT", gateway.to_string())
        .env("DEMO_ADMIN_PORT", admin.to_string())
        .env("SERVICE_RESTART_DELAY_S", "3")
        .env_remove("REDIS")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut demo = Demo { child, log };
    let client = Client::new(format!("http://127.0.0.1:{gateway}"));
    let web = token("NORTHWIND_WEB").unwrap();
    let recon = token("NORTHWIND_RECON").unwrap();
    let export = token("NORTHWIND_EXPORT").unwrap();
    let repair = [("x-traffic-class", "repair")];

    assert!(
        until(Duration::from_secs(90), || client
            .get_as("/orders/1", &web, &[])
            .is_ok_and(|r| r.status == 200)),
        "the demo did not come up\n{}",
        demo.logs()
    );
    let first = service_pid(&run_dir).expect("run-demo.sh writes service.pid");
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    assert!(until(Duration::from_secs(5), || !alive(first)));

    // Down: Envoy answers, repair is served, export fails closed.
    let r = client.get_as("/orders/1", &recon, &repair).unwrap();
    assert_eq!(
        r.status,
        200,
        "repair while the service is down\n{}",
        r.describe()
    );
    let r = client.get_as("/exports/daily", &export, &[]).unwrap();
    assert_eq!(
        r.status,
        503,
        "export while the service is down\n{}",
        r.describe()
    );

    // The script reports the exit and starts the service again.
    assert!(
        until(Duration::from_secs(60), || service_pid(&run_dir)
            .is_some_and(|p| p != first && alive(p))
            && demo.logs().contains("laneguard-service is back")),
        "the service was not restarted\n{}",
        demo.logs()
    );
    let logs = demo.logs();
    assert!(logs.contains("exited with status"), "{logs}");
    assert!(logs.contains("Envoy stays up"), "{logs}");
    assert!(
        until(Duration::from_secs(30), || client
            .get_as("/exports/daily", &export, &[])
            .is_ok_and(
                |r| r.status == 200 && r.header("x-laneguard-degraded").is_none()
            )),
        "export is not served centrally after the restart\n{}",
        demo.logs()
    );
    let second = service_pid(&run_dir).unwrap();
    assert!(
        demo.stop(),
        "run-demo.sh did not stop on SIGTERM\n{}",
        demo.logs()
    );
    assert!(
        until(Duration::from_secs(5), || !alive(second)),
        "the restarted service outlived the script"
    );
}
