//! Boots a Linux guest under QEMU/TCG against the vhost-user-blk backend serving an in-memory
//! device, then checks the device bytes from the Rust side.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::{MemDevice, runtime, temp_socket, wait_for_socket, yes_pattern};
use vhost_blk::vhost_user::{ServeControl, VhostUserBlkOptions, serve_vhost_user_blk};

const MIB: usize = 1 << 20;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn linux_guest_reads_writes_discards() {
    // No silent skip: `make test` installs QEMU, the cloud kernel and busybox-static.
    assert!(
        have("qemu-system-x86_64") && Path::new("/bin/busybox").exists(),
        "qemu-system-x86_64 / busybox-static missing (make test installs them)"
    );
    let guest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest");
    let kit = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-kit");
    let st = Command::new(guest_dir.join("make-initramfs.sh"))
        .arg(&kit)
        .status()
        .unwrap();
    assert!(st.success(), "make-initramfs.sh failed");

    // 64 MiB device: 0x5a everywhere, "SOVPREFILL\n" at 32 MiB for the guest to read.
    let device = Arc::new(MemDevice::new(64 * MIB, 0x5a));
    let prefill = yes_pattern("SOVPREFILL", MIB);
    device.data.lock().unwrap()[32 * MIB..33 * MIB].copy_from_slice(&prefill);

    let rt = runtime();
    let socket = temp_socket("guest");
    let control = ServeControl::new();
    let opts = VhostUserBlkOptions {
        num_queues: 2,
        queue_size: 256,
        serial: "sov-test-serial".into(),
        control: control.clone(),
    };
    let server = {
        let (socket, device, handle) = (socket.clone(), device.clone(), rt.handle().clone());
        std::thread::spawn(move || serve_vhost_user_blk(&socket, device, handle, opts))
    };
    wait_for_socket(&socket);

    let start = Instant::now();
    let out = Command::new(guest_dir.join("run-guest.sh"))
        .arg(&socket)
        .arg(&kit)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    eprintln!("{log}\nguest run took {:?}", start.elapsed());
    assert!(out.status.success(), "guest did not PASS");
    let result = log
        .lines()
        .find(|l| l.starts_with("SOV-GUEST-RESULT:"))
        .unwrap();
    assert!(result.contains("size=131072"), "{result}");
    assert!(result.contains("serial=sov-test-serial"), "{result}");
    assert!(result.contains("discard=ok"), "{result}");

    // QEMU exited: the serve call returns on the disconnect.
    server.join().unwrap().expect("serve_vhost_user_blk");

    let data = device.data.lock().unwrap();
    assert!(
        data[..MIB].iter().all(|&b| b == 0x5a),
        "untouched range changed"
    );
    assert!(
        data[MIB..5 * MIB] == yes_pattern("SOVPATTERN", 4 * MIB)[..],
        "pattern did not reach the device"
    );
    assert!(data[8 * MIB..10 * MIB] == yes_pattern("SOVCPU0", 2 * MIB)[..]);
    assert!(data[12 * MIB..14 * MIB] == yes_pattern("SOVCPU1", 2 * MIB)[..]);
    assert!(data[16 * MIB..17 * MIB].iter().all(|&b| b == 0), "discard");
    assert!(data[17 * MIB..18 * MIB].iter().all(|&b| b == 0x5a));
    if result.contains("write_zeroes=ok") {
        assert!(
            data[20 * MIB..21 * MIB].iter().all(|&b| b == 0),
            "write zeroes"
        );
    }
    assert!(data[32 * MIB..33 * MIB] == prefill[..]);

    let per_queue = control.completed_per_queue();
    eprintln!("completed requests per queue: {per_queue:?}");
    assert_eq!(per_queue.len(), 2);
    assert!(
        per_queue.iter().all(|&n| n > 0),
        "both queues used: {per_queue:?}"
    );
}
