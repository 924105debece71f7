//! The engine suites with the S3 image store (a real SeaweedFS): qemu-io patterns (aligned
//! and not), fio with crc32c verification (aligned and 3000-byte blocks), an ext4 round trip,
//! and recovery of an image checkpointed in many rounds. Every server checkpoints every
//! 200 ms, so data really moves into S3 layers; then the server is killed and a new one with
//! a FRESH buffer store (nothing local carried over) must read everything back from S3 alone.

mod s3_common;

use mvps_conformance::fs::{Mount, Qsd};
use mvps_conformance::nbd::CMD_FLAG_NO_HOLE;
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, heavy, pattern, run, sh, wait_for, Output};
use s3_common::{fio_writes, S3};
use std::time::Duration;

const T: Duration = Duration::from_secs(300);

/// Waits until the last thing `s` logged about `image_id` is closing it as idle: every
/// client is gone and the buffer was checkpointed empty, so the image lives in S3 alone.
#[track_caller]
fn wait_all_in_s3(s: &Server, image_id: &str) {
    let mention = format!("image {image_id}");
    wait_for(
        &format!("{image_id} checkpointed and closed"),
        Duration::from_secs(60),
        || {
            let log = s.log();
            let last = log.lines().rev().find(|l| l.contains(&mention))?;
            last.ends_with(&format!("{mention}: idle, closed"))
                .then_some(())
        },
    );
}

/// One `qemu-io` run; no pattern check may fail.
#[track_caller]
fn qemu_io(s: &Server, tok: &str, cmds: &[&str]) -> Output {
    let mut c = cmd("qemu-io", ["--image-opts", &s.qemu_opts(tok)]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(&mut c, T).ok();
    assert!(!out.all().contains("verification failed"), "{out}");
    assert!(!out.all().to_lowercase().contains("error"), "{out}");
    out
}

#[test]
fn qemu_io_patterns_read_back_from_s3_with_a_fresh_buffer_store() {
    let s3 = S3::new();
    let mut a = s3.start(&[]);
    let id = token::image_id("s3-qio");
    let tok = token::token(&id, 64 << 20);
    qemu_io(&a, &tok, &["write -P 0xab 0 64k", "write -P 0x5a 1M 1M"]);
    qemu_io(
        &a,
        &tok,
        &["write -P 0x11 70000 5000", "write -P 0x22 73990 10"],
    );
    // Let those move into layers, then write over them partially (read-modify-write of
    // pages that now come from S3).
    wait_all_in_s3(&a, &id);
    qemu_io(
        &a,
        &tok,
        &[
            "write -P 0x33 33554431 1",
            "write -P 0x44 40000001 100003",
            "write -z 1050000 777",
            "discard 1179648 65536",
            "write -P 0x66 65530 12",
        ],
    );
    let reads = [
        "read -P 0xab 0 65530",
        "read -P 0x66 65530 12",
        "read -P 0 65542 4458",
        "read -P 0x11 70000 3990",
        "read -P 0x22 73990 10",
        "read -P 0x11 74000 1000",
        "read -P 0 75000 973576",
        "read -P 0x5a 1048576 1424",
        "read -P 0 1050000 777",
        "read -P 0x5a 1050777 128871",
        "read -P 0 1179648 65536",
        "read -P 0x5a 1245184 851968",
        "read -P 0 2097152 1",
        "read -P 0 33554430 1",
        "read -P 0x33 33554431 1",
        "read -P 0 33554432 1",
        "read -P 0x44 40000001 100003",
        "read -P 0 40100004 1",
    ];
    qemu_io(&a, &tok, &reads);
    wait_all_in_s3(&a, &id);
    a.kill9();

    let b = s3.start(&[]);
    let out = qemu_io(&b, &tok, &reads);
    assert!(
        out.stdout
            .contains("read 100003/100003 bytes at offset 40000001"),
        "{out}"
    );
    // The check can fail: a wrong pattern is reported.
    let mut c = cmd("qemu-io", ["--image-opts", &b.qemu_opts(&tok)]);
    let bad = run(c.args(["-c", "read -P 0xab 65530 12"]), T);
    assert!(bad.all().contains("Pattern verification failed"), "{bad}");
}

fn fio(s: &Server, tok: &str, bs: &str, size: &str, extra: &[&str]) -> Output {
    let uri = format!("--uri={}", s.uri(tok));
    let mut c = cmd(
        "fio",
        ["--name=s3", "--ioengine=nbd", &uri, "--rw=randwrite"],
    );
    c.args([
        &format!("--bs={bs}"),
        &format!("--size={size}"),
        "--iodepth=16",
    ]);
    c.args([
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--randseed=4243",
        "--verify_state_save=0",
    ]);
    c.args(extra);
    run(&mut c, T)
}

#[test]
fn fio_verifies_from_s3_with_a_fresh_buffer_store() {
    let _h = heavy();
    let s3 = S3::new();
    let mut a = s3.start(&[]);
    // 4 KiB blocks, and 3000-byte blocks whose partial pages are read-modify-written.
    let jobs = [("4k", "16M", 16u64 << 20), ("3000", "12000000", 16 << 20)];
    let mut images = Vec::new();
    for (bs, size, image_size) in jobs {
        let id = token::image_id("s3-fio");
        let tok = token::token(&id, image_size);
        // Paced a little so that checkpoints happen while fio writes.
        let out = fio(&a, &tok, bs, size, &["--do_verify=1", "--rate_iops=,4000"]).ok();
        assert!(!out.all().contains("verify: bad"), "{out}");
        let writes = fio_writes(&out.stdout);
        assert!(writes >= 4000, "{out}");
        images.push((id, tok, bs, size, writes));
    }
    for (id, _, _, _, writes) in &images {
        let m = s3.wait_for_changes(id, *writes, Duration::from_secs(60));
        assert_eq!(m.change_count, *writes);
        assert!(m.generation >= 3, "expected several checkpoints: {m:?}");
    }
    a.kill9();

    let b = s3.start(&[]);
    for (_, tok, bs, size, _) in &images {
        let out = fio(&b, tok, bs, size, &["--verify_only"]).ok();
        assert!(!out.all().contains("verify: bad"), "{out}");
    }
    // The check can fail: the same verification of a never-written image does.
    let fresh = token::token(&token::image_id("s3-fio-fresh"), 16 << 20);
    let out = fio(&b, &fresh, "4k", "16M", &["--verify_only"]).fails();
    assert!(out.all().contains("verify"), "{out}");
}

#[test]
fn ext4_files_survive_on_s3_with_a_fresh_buffer_store() {
    const SIZE: u64 = 256 << 20;
    let _h = heavy();
    let s3 = S3::new();
    let mut a = s3.start(&[]);
    let id = token::image_id("s3-ext4");
    let tok = token::token(&id, SIZE);
    let work = tempfile::tempdir().unwrap();
    let (img, mnt) = (work.path().join("fuse.img"), work.path().join("mnt"));
    let sums = work.path().join("sums");

    let q = Qsd::start(&a, &tok, &img, SIZE);
    run(cmd("mkfs.ext4", ["-q", "-F"]).arg(&img), T).ok();
    let m = Mount::new(&img, &mnt);
    let script = format!(
        "set -e; cd '{mnt}'; mkdir -p a/b/c; \
         dd if=/dev/urandom of=big bs=1M count=24 status=none; \
         dd if=/dev/urandom of=a/odd bs=1 count=4097 status=none; \
         for i in $(seq 1 100); do head -c $((i * 37)) /dev/urandom > a/b/c/f$i; done; \
         echo hello > a/hello; ln -s hello a/link; \
         find . -type f -print0 | sort -z | xargs -0 sha256sum > '{sums}'",
        mnt = mnt.display(),
        sums = sums.display()
    );
    sh(&script, T);
    assert_eq!(std::fs::read_to_string(&sums).unwrap().lines().count(), 103);
    m.umount();
    q.stop();
    wait_all_in_s3(&a, &id);
    a.kill9();

    let b = s3.start(&[]);
    let q = Qsd::start(&b, &tok, &img, SIZE);
    let m = Mount::new(&img, &mnt);
    let out = sh(
        &format!(
            "cd '{}' && sha256sum -c --quiet '{}' && readlink a/link",
            mnt.display(),
            sums.display()
        ),
        T,
    );
    assert_eq!(out.trim(), "hello");
    m.umount();
    let fsck = run(cmd("e2fsck", ["-fn"]).arg(&img), T);
    assert_eq!(fsck.status.code(), Some(0), "e2fsck found problems: {fsck}");
    q.stop();
}

#[test]
fn recovery_of_many_checkpoints_with_a_fresh_buffer_store() {
    const SIZE: u64 = 8 << 20;
    let s3 = S3::new();
    let mut a = s3.start(&[]);
    let id = token::image_id("s3-recover");
    let tok = token::token(&id, SIZE);
    let mut model = vec![0u8; SIZE as usize];
    let mut changes = 0u64;
    let mut c = a.open(&tok);
    // Five rounds, each checkpointed into its own layer(s), each partly overwriting,
    // trimming and zeroing what earlier layers hold.
    for round in 0..5u64 {
        for k in 0..6u64 {
            let off = (round * 977_777 + k * 1_311_111) % (SIZE - 70_000);
            let data = pattern(round * 10 + k, 1000 + (k as usize * 9_777));
            c.write(off, &data).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            changes += 1;
        }
        let off = (round * 1_234_567) % (SIZE - 200_000);
        c.trim(off, 65_536).unwrap();
        model[off as usize..off as usize + 65_536].fill(0);
        let off = off + 100_003;
        c.write_zeroes(off, 5_000, CMD_FLAG_NO_HOLE).unwrap();
        model[off as usize..off as usize + 5_000].fill(0);
        changes += 2;
        c.flush().unwrap();
        s3.wait_for_changes(&id, changes, Duration::from_secs(30));
        // Reads now come from the layers in S3 (through the block cache).
        assert!(c.read(0, SIZE as u32) == Ok(model.clone()), "round {round}");
    }
    let m = s3.manifest(&id).unwrap();
    assert_eq!(m.change_count, changes);
    // Generation 1 is the takeover; each round checkpointed at least once (compaction may
    // have merged the layers since).
    assert!(m.generation >= 6, "{m:?}");
    assert!(!m.layers.is_empty(), "{m:?}");
    drop(c);
    a.kill9();

    // Fresh buffer store: the same bytes, from S3 alone.
    let b = s3.start(&[]);
    let mut c = b.open(&tok);
    assert!(
        c.read(0, SIZE as u32) == Ok(model.clone()),
        "recovered image differs"
    );
    assert!(
        b.log().contains(&format!("image {id}: took over")),
        "{}",
        b.log_tail()
    );
    // And it keeps going: a write on top of the recovered layers reads back.
    c.write(4095, &[0xee; 2]).unwrap();
    model[4095..4097].fill(0xee);
    assert!(c.read(0, 8192) == Ok(model[..8192].to_vec()));
}
