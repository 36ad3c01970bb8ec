use std::fs::File;

use crate::durable_file::temporary_name;

use super::folder_lock::{WRITE_PROBE, is_at, open_lock_file, utc_time};
use super::recovery::{DAMAGED_SUFFIX, damaged_in};
use super::*;

fn arrays(scale: f32) -> Vec<NamedArray> {
    vec![
        NamedArray {
            name: "policy/w".to_owned(),
            shape: vec![2, 3],
            values: (0..6).map(|i| i as f32 * scale).collect(),
        },
        NamedArray {
            name: "adam/m/w".to_owned(),
            shape: vec![2, 3],
            values: vec![0.5; 6],
        },
    ]
}

/// The newest `newest`, nothing known sound.
fn keep(newest: usize) -> Keep {
    Keep {
        newest,
        sound_through: None,
    }
}

fn state(step: u64) -> CheckpointState {
    CheckpointState {
        format: FORMAT,
        step,
        version: step,
        config: "seed = 3\n".to_owned(),
        evaluator: EvaluatorState {
            samples_so_far: 4096,
            best: vec![(-1.5, vec![1, 0, 1])],
        },
        sound_through: SoundThrough::Step(step.saturating_sub(10)),
        ..CheckpointState::default()
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flgfn-ckpt-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

#[test]
fn a_checkpoint_reads_back_exactly_and_only_the_last_k_stay() {
    let dir = scratch("round-trip");
    for step in [100, 200, 300, 400] {
        save(&dir, &state(step), &arrays(step as f32), keep(2)).unwrap();
    }
    let steps: Vec<u64> = list(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [300, 400]);
    let latest = load_latest(&dir).unwrap().unwrap();
    assert_eq!(latest.state, state(400));
    assert_eq!(latest.group("policy")[0].values, arrays(400.0)[0].values);
    assert_eq!(latest.group("adam/m")[0].name, "w");
    // No temporary file is left behind.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
    fs::remove_dir_all(&dir).unwrap();
}

/// Pruning keeps the newest checkpoint at or before the last step
/// known sound beside the newest `keep_checkpoints`, and lets it go
/// once a sounder one is among those.
#[test]
fn pruning_keeps_the_newest_checkpoint_known_sound() {
    let dir = scratch("sound");
    let steps =
        |dir: &Path| -> Vec<u64> { list(dir).unwrap().into_iter().map(|(s, _)| s).collect() };
    let sound_through = |step| Keep {
        newest: 2,
        sound_through: Some(step),
    };
    for step in [100, 200, 300, 400, 500] {
        save(&dir, &state(step), &arrays(1.0), sound_through(250)).unwrap();
    }
    assert_eq!(steps(&dir), [200, 400, 500]);
    assert_eq!(newest_at_or_before(&dir, 399).map(|(s, _)| s), Some(200));
    assert_eq!(newest_at_or_before(&dir, 99), None);
    // Sound again, and among the newest: nothing more is kept.
    save(&dir, &state(600), &arrays(1.0), sound_through(600)).unwrap();
    assert_eq!(steps(&dir), [500, 600]);
    // Nothing at or before it: the newest two, as without it.
    save(&dir, &state(700), &arrays(1.0), sound_through(50)).unwrap();
    assert_eq!(steps(&dir), [600, 700]);
    fs::remove_dir_all(&dir).unwrap();
}

/// A writer writes in the order started, one at a time, and what
/// [`Writer::finish`] returns has been written.
#[test]
fn a_writer_writes_in_order_and_keeps_the_newest() {
    let dir = scratch("writer");
    let mut writer = Writer::new(dir.clone(), 2);
    for step in [100, 200, 300, 400] {
        writer.start(state(step), arrays(step as f32)).unwrap();
    }
    writer.finish().unwrap();
    let steps: Vec<u64> = list(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [300, 400]);
    let latest = load_latest(&dir).unwrap().unwrap();
    assert_eq!(latest.state, state(400));
    assert_eq!(latest.group("policy")[0].values, arrays(400.0)[0].values);
    // Nothing left to wait for.
    writer.finish().unwrap();
    writer.poll().unwrap();
    fs::remove_dir_all(&dir).unwrap();
}

/// A failed write comes back from `poll` once it has ended (and only
/// once), or from the next `start`, which then writes nothing.
#[test]
fn a_failed_write_comes_back_once() {
    let parent = scratch("writer-fails");
    fs::create_dir_all(&parent).unwrap();
    // A file where the folder should be: every write fails.
    let dir = parent.join("checkpoints");
    fs::write(&dir, "not a folder").unwrap();
    let mut writer = Writer::new(dir.clone(), 2);
    writer.start(state(100), arrays(1.0)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let error = loop {
        match writer.poll() {
            Err(error) => break error.to_string(),
            Ok(()) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the write never ended"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    };
    assert!(error.contains(&dir.display().to_string()), "{error}");
    writer.poll().unwrap();
    writer.finish().unwrap();

    writer.start(state(200), arrays(2.0)).unwrap();
    let error = writer
        .start(state(300), arrays(3.0))
        .unwrap_err()
        .to_string();
    assert!(error.contains(&dir.display().to_string()), "{error}");
    // The 300 was not started: nothing is pending.
    writer.finish().unwrap();
    fs::remove_dir_all(&parent).unwrap();
}

/// Checkpoints written before builds and the step known sound were
/// recorded still resume, with both unknown.
#[test]
fn a_state_without_a_build_or_sound_step_reads_as_unknown() {
    let state = CheckpointState {
        build: crate::BUILD.to_owned(),
        ..state(70)
    };
    let mut json = serde_json::to_value(&state).unwrap();
    assert_eq!(json["build"], crate::BUILD);
    assert_eq!(json["sound_through"], serde_json::json!({"step": 60}));
    json.as_object_mut().unwrap().remove("build");
    json.as_object_mut().unwrap().remove("sound_through");
    let read: CheckpointState = serde_json::from_value(json).unwrap();
    assert_eq!(
        read,
        CheckpointState {
            build: String::new(),
            sound_through: SoundThrough::Unknown,
            ..state.clone()
        }
    );
    let nothing = CheckpointState {
        sound_through: SoundThrough::Nothing,
        ..state
    };
    let json = serde_json::to_string(&nothing).unwrap();
    assert_eq!(
        serde_json::from_str::<CheckpointState>(&json).unwrap(),
        nothing
    );
}

/// A learner refused while another holds a new folder leaves the
/// holder's lock file (and folder) alone; a lock file removed or
/// replaced under an open one is found out.
#[test]
fn a_refused_learner_leaves_the_holders_lock_alone() {
    let parent = scratch("lock-holder");
    let dir = parent.join("new");
    let held = lock(&dir).unwrap();
    assert!(lock(&dir).is_err());
    assert!(dir.join(LOCK).exists(), "the holder's lock file stays");
    let (file, made) = open_lock_file(&dir.join(LOCK)).unwrap();
    assert!(!made);
    assert!(is_at(&file, &dir.join(LOCK)));
    fs::remove_file(dir.join(LOCK)).unwrap();
    assert!(!is_at(&file, &dir.join(LOCK)), "removed");
    let (_, made) = open_lock_file(&dir.join(LOCK)).unwrap();
    assert!(made);
    assert!(!is_at(&file, &dir.join(LOCK)), "replaced");
    drop(held);
    let _ = fs::remove_dir_all(&parent);
}

/// The lock's holder is dated as a person reads a date.
#[test]
fn unix_times_read_as_utc_dates() {
    assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(utc_time(1_764_944_000), "2025-12-05 14:13:20 UTC");
    assert_eq!(utc_time(1_798_761_599), "2026-12-31 23:59:59 UTC");
    // 2100 is no leap year.
    assert_eq!(utc_time(4_107_542_400), "2100-03-01 00:00:00 UTC");
}

#[test]
fn one_learner_at_a_time_uses_a_checkpoint_folder() {
    let dir = scratch("lock").join("made");
    let held = lock(&dir).unwrap();
    assert!(held.is_locked(), "this file system locks");
    let error = lock(&dir).unwrap_err().to_string();
    assert!(
        error.contains("in use by another learner") && error.contains("learner.checkpoint_dir"),
        "{error}"
    );
    // The holder is named.
    assert!(
        error.contains(&format!("(pid {} on ", std::process::id())),
        "{error}"
    );
    drop(held);
    assert!(lock(&dir).unwrap().is_locked(), "free again once released");
    let _ = fs::remove_dir_all(dir.parent().unwrap());
}

/// A learner refused at start-up, its folder opened, leaves nothing
/// behind: not the folders made for it, nor its lock file. A folder
/// that holds anything else keeps the lock file.
#[test]
fn a_folder_that_holds_only_the_lock_is_removed_when_let_go() {
    let parent = scratch("lock-left");
    fs::create_dir_all(&parent).unwrap();
    let dir = parent.join("runs/a");
    drop(lock(&dir).unwrap());
    assert!(!parent.join("runs").exists(), "the folders made are gone");
    assert!(parent.exists(), "a folder that was there stays");
    // Where something else was written, the lock file stays too.
    let held = lock(&dir).unwrap();
    fs::write(dir.join(VERSION_FLOOR), "7").unwrap();
    drop(held);
    assert!(dir.join(LOCK).exists() && dir.join(VERSION_FLOOR).exists());
    // A lock file this learner did not make stays, even alone.
    fs::remove_file(dir.join(VERSION_FLOOR)).unwrap();
    drop(lock(&dir).unwrap());
    assert!(dir.join(LOCK).exists());
    fs::remove_dir_all(&parent).unwrap();
}

#[test]
fn every_float_of_the_state_reads_back_bit_for_bit() {
    // Decimal text parsed back must give the same f64, not one a last
    // bit away: a resumed run continues exactly.
    let mut bits = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..2000 {
        bits = bits
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let x = ((bits >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 100.0;
        let mut state = state(1);
        state.wall_s = x;
        state.time_to_quality_s = Some(x / 3.0);
        state.totals.lag_weighted = x * 1e7;
        let json = serde_json::to_string(&state).unwrap();
        let back: CheckpointState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.wall_s.to_bits(), x.to_bits(), "{x:e} as {json}");
        assert_eq!(back, state);
    }
}

#[test]
fn a_checkpoint_goes_into_folders_made_for_it_several_levels_deep() {
    let dir = scratch("nested");
    let deep = dir.join("a").join("b").join("c");
    save(&deep, &state(100), &arrays(1.0), keep(2)).unwrap();
    assert_eq!(load_latest(&deep).unwrap().unwrap().state.step, 100);
    assert_eq!(
        durable_file::parent_of(Path::new("checkpoints")),
        Some(Path::new("."))
    );
    assert_eq!(durable_file::parent_of(Path::new("/")), None);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unfinished_writes_are_removed_and_nothing_else() {
    let dir = scratch("unfinished");
    save(&dir, &state(100), &arrays(1.0), keep(5)).unwrap();
    for leftover in [
        ".ckpt-000000000200.safetensors.tmp",
        ".final.safetensors.tmp",
    ] {
        fs::write(dir.join(leftover), b"half").unwrap();
    }
    fs::write(dir.join(".notes.tmp"), b"not ours").unwrap();
    assert_eq!(remove_unfinished_writes(&dir), 2);
    let mut left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [".notes.tmp", &file_name(100)]);
    assert_eq!(load_latest(&dir).unwrap().unwrap().state.step, 100);
    fs::remove_dir_all(&dir).unwrap();
}

/// JSON has no NaN: a state holding one would be written as `null`
/// and never read back. Refused by name instead.
#[test]
fn a_state_with_a_non_finite_number_is_not_saved() {
    let dir = scratch("non-finite");
    let mut bad = state(100);
    bad.totals.waiting_s = f64::NAN;
    let error = save(&dir, &bad, &arrays(1.0), keep(2))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("cannot save step 100") && error.contains("`totals.waiting_s` is NaN"),
        "{error}"
    );
    assert!(list(&dir).unwrap().is_empty());
    let _ = fs::remove_dir_all(&dir);
}

/// A checkpoint renamed by hand (a rollback done by copying) is
/// refused at a resume, which would prune every checkpoint it writes
/// as older than the name; read as it is by a reader.
#[test]
fn a_checkpoint_named_for_another_step_is_refused_at_a_resume() {
    let dir = scratch("renamed");
    let at_100 = save(&dir, &state(100), &arrays(1.0), keep(5)).unwrap();
    save(&dir, &state(200), &arrays(2.0), keep(5)).unwrap();
    fs::rename(&at_100, dir.join(file_name(300))).unwrap();
    let error = load_latest(&dir).unwrap_err().to_string();
    assert!(
        error.contains(&file_name(300))
            && error.contains("holds step 100 but is named for step 300")
            && error.contains(&format!("rename it {}", file_name(100))),
        "{error}"
    );
    let read = load_latest_to_read(&dir).unwrap().unwrap();
    assert_eq!(read.state.step, 100);
    // A copy of one whose right name is taken: not renamed over it.
    save(&dir, &state(100), &arrays(1.0), keep(5)).unwrap();
    let error = load_latest(&dir).unwrap_err().to_string();
    assert!(
        error.contains(&format!(
            "delete it ({} is already there and reads back)",
            file_name(100)
        )),
        "{error}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// A folder the learner cannot write in, though its lock file opens
/// (made read-only since), is refused at the lock, naming the key,
/// not at the first checkpoint. (Here the probe's name is taken by a
/// folder: root writes in read-only folders.)
#[test]
fn a_folder_where_the_probe_cannot_be_written_is_refused_at_start() {
    let dir = scratch("read-only");
    fs::create_dir_all(&dir).unwrap();
    let held = lock(&dir).unwrap();
    // The probe leaves nothing behind.
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [LOCK]);
    drop(held);
    fs::create_dir(dir.join(temporary_name(WRITE_PROBE))).unwrap();
    let error = lock(&dir).unwrap_err().to_string();
    assert!(
        error.contains("learner.checkpoint_dir must be a folder this learner can write in"),
        "{error}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// Damaged checkpoints set aside are kept for a post-mortem, the
/// newest few: each is checkpoint-sized.
#[test]
fn only_the_newest_damaged_checkpoints_stay_set_aside() {
    let dir = scratch("damaged-kept");
    fs::create_dir_all(&dir).unwrap();
    // By when they were written: a stale one of a later step (from
    // before a resume further back) goes before new ones.
    let written = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
    for (at, step) in [500, 100, 200, 300].into_iter().enumerate() {
        let path = dir.join(file_name(step));
        fs::write(&path, b"torn").unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(written + std::time::Duration::from_secs(at as u64))
            .unwrap();
        set_aside(&[path]).unwrap();
    }
    let kept: Vec<u64> = damaged_in(&dir).into_iter().map(|(step, _)| step).collect();
    assert_eq!(kept, [200, 300]);
    assert_eq!(DAMAGED_KEPT, 2);
    // --fresh removes them too.
    clear(&dir).unwrap();
    assert!(damaged_in(&dir).is_empty());
    fs::remove_dir_all(&dir).unwrap();
}

/// A write into a folder that a file has replaced names that file as
/// not a folder (the full suite once caught a checkpoint write failing
/// so, as "Not a directory (os error 20)" alone).
#[test]
fn a_write_under_a_file_names_the_file_as_not_a_folder() {
    let parent = scratch("replaced-folder");
    fs::create_dir_all(&parent).unwrap();
    let folder = parent.join("checkpoints");
    fs::write(&folder, "not a folder").unwrap();
    let inside = folder.join("ckpt.tmp");
    let error = fs::write(&inside, b"x").unwrap_err();
    let message = io_error(&inside, error).to_string();
    assert!(
        message.contains(&format!(
            "{}: not a folder (learner.checkpoint_dir, or one of its parents, is a file)",
            folder.display()
        )),
        "{message}"
    );
    // And where the folder is to be locked (it, or one below it, made),
    // or a file written in it.
    for error in [
        lock(&folder).err().unwrap(),
        lock(&folder.join("deeper")).err().unwrap(),
        write_file(&folder, FINAL_WEIGHTS, b"x").unwrap_err(),
    ] {
        assert!(
            error.to_string().contains(&format!(
                "{}: not a folder (learner.checkpoint_dir, or one of its parents, is a file)",
                folder.display()
            )),
            "{error}"
        );
    }
    fs::remove_dir_all(&parent).unwrap();
}

#[test]
fn a_truncated_or_flipped_checkpoint_is_refused_and_the_previous_one_used() {
    let dir = scratch("damaged");
    save(&dir, &state(100), &arrays(1.0), keep(5)).unwrap();
    let newest = save(&dir, &state(200), &arrays(2.0), keep(5)).unwrap();
    let good = fs::read(&newest).unwrap();

    // Torn: the last bytes never reached the disk.
    fs::write(&newest, &good[..good.len() - 7]).unwrap();
    assert!(read(&newest).is_err());
    let resumed = load_latest(&dir).unwrap().unwrap();
    assert_eq!(resumed.state.step, 100);
    assert_eq!(resumed.damaged_newer, std::slice::from_ref(&newest));
    assert!(newest.exists(), "reading changes nothing");
    // A damaged one that cannot be moved aside (here a folder holds
    // its new name) stops the learner, named: left in place, it would
    // outrank the resumed run's checkpoints, and pruning delete them.
    let aside = dir.join(format!("{}{DAMAGED_SUFFIX}", file_name(200)));
    fs::create_dir_all(aside.join("blocker")).unwrap();
    let error = set_aside(&resumed.damaged_newer).unwrap_err().to_string();
    assert!(
        error.contains(&newest.display().to_string()) && error.contains("by hand"),
        "{error}"
    );
    fs::remove_dir_all(&aside).unwrap();
    set_aside(&resumed.damaged_newer).unwrap();
    // Set aside: the resumed run's next checkpoint is the newest, and
    // pruning keeps it.
    assert!(aside.exists() && !newest.exists());
    let resumed = save(&dir, &state(150), &arrays(1.5), keep(2)).unwrap();
    let steps: Vec<u64> = list(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [100, 150]);
    fs::remove_file(&resumed).unwrap();

    // One flipped byte anywhere: in the tensor data, or in the JSON.
    for at in [good.len() - 3, good.len() / 2, 40] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x10;
        fs::write(&newest, &flipped).unwrap();
        let error = read(&newest).unwrap_err();
        // Damaged (set aside, the previous one used), not another
        // format (which would stop the resume).
        assert!(
            matches!(parse(&newest, &flipped), Err(Unusable::Damaged(_))),
            "byte {at}: {error}"
        );
        assert_eq!(
            load_latest(&dir).unwrap().unwrap().state.step,
            100,
            "byte {at}"
        );
    }

    // An intact checkpoint of another format is not damage, for which
    // an older one would stand in (losing its progress): it stops the
    // resume, named.
    let mut future = state(200);
    future.format = FORMAT + 1;
    save(&dir, &future, &arrays(2.0), keep(5)).unwrap();
    let error = load_latest(&dir).unwrap_err().to_string();
    assert!(
        error.contains(&file_name(200)) && error.contains("format 2"),
        "{error}"
    );
    assert!(!error.contains("it is damaged"), "{error}");
    // Also where that format sums otherwise (its checksum does not
    // hold by this learner's reckoning).
    let path = dir.join(file_name(200));
    let mut decoded = weights::decode(&fs::read(&path).unwrap()).unwrap();
    decoded
        .metadata
        .insert(CHECKSUM_KEY.to_owned(), "12345".to_owned());
    let resummed =
        weights::encode(&decoded.arrays, WeightEncoding::F32, &decoded.metadata).unwrap();
    fs::write(&path, resummed).unwrap();
    let error = load_latest(&dir).unwrap_err().to_string();
    assert!(
        error.contains(&file_name(200)) && error.contains("format 2"),
        "{error}"
    );
    // ...which a flipped digit reads the same as: the error says so.
    assert!(
        error.contains("checksum does not hold") && error.contains("it is damaged"),
        "{error}"
    );
    // ...and where that format stores tensors this learner cannot
    // decode (another dtype, here I32 in F32's place): still another
    // version's, not damage.
    save(&dir, &future, &arrays(2.0), keep(5)).unwrap();
    let as_i32 = |bytes: Vec<u8>| {
        let at = bytes.windows(5).position(|w| w == b"\"F32\"").unwrap();
        let mut bytes = bytes;
        bytes[at + 1..at + 4].copy_from_slice(b"I32");
        bytes
    };
    fs::write(&path, as_i32(fs::read(&path).unwrap())).unwrap();
    let error = load_latest(&dir).unwrap_err().to_string();
    assert!(
        error.contains(&file_name(200))
            && error.contains("format 2")
            && error.contains("not readable here")
            && error.contains("I32"),
        "{error}"
    );
    // In this learner's own format, the same is damage.
    save(&dir, &state(200), &arrays(2.0), keep(5)).unwrap();
    fs::write(&path, as_i32(fs::read(&path).unwrap())).unwrap();
    assert!(matches!(
        parse(&path, &fs::read(&path).unwrap()),
        Err(Unusable::Damaged(_))
    ));
    // A format no version writes is damage: the one before is used.
    let mut zero = state(200);
    zero.format = 0;
    save(&dir, &zero, &arrays(2.0), keep(5)).unwrap();
    assert!(matches!(
        parse(&path, &fs::read(&path).unwrap()),
        Err(Unusable::Damaged(_))
    ));
    assert_eq!(load_latest(&dir).unwrap().unwrap().state.step, 100);
    fs::write(&newest, &good[..good.len() - 7]).unwrap();

    // Every checkpoint damaged: an error, not a silent fresh start.
    let oldest = dir.join(file_name(100));
    fs::write(&oldest, b"garbage").unwrap();
    let error = load_latest(&dir).unwrap_err().to_string();
    assert!(error.contains("--fresh"), "{error}");
    // A reader is given a reader's remedy.
    let error = load_latest_to_read(&dir).unwrap_err().to_string();
    assert!(
        error.contains("is damaged") && !error.contains("--fresh"),
        "{error}"
    );
    write_version_floor(&dir, 1200).unwrap();
    assert_eq!(read_version_floor(&dir).unwrap(), 1200);
    // A floor that is not a number: named, with what to write there
    // (not --fresh, which would delete every checkpoint too).
    fs::write(dir.join(VERSION_FLOOR), "12x\n").unwrap();
    let error = read_version_floor(&dir).unwrap_err().to_string();
    assert!(
        error.contains(VERSION_FLOOR)
            && error.contains("\"12x\"")
            && error.contains("write in a number"),
        "{error}"
    );
    fs::write(dir.join(VERSION_FLOOR), b"12\xff\n").unwrap();
    let error = read_version_floor(&dir).unwrap_err().to_string();
    assert!(error.contains("write in a number"), "{error}");
    write_version_floor(&dir, 1200).unwrap();

    // A newest one that cannot be read at all (here a folder by its
    // name: EISDIR, as EIO or EACCES would be) is named, not skipped.
    let unreadable = dir.join(file_name(300));
    fs::create_dir(&unreadable).unwrap();
    let error = load_latest(&dir).unwrap_err().to_string();
    assert!(error.contains(&file_name(300)), "{error}");
    fs::remove_dir(&unreadable).unwrap();
    // Nor is a link to nothing (a file moved away, a volume not mounted):
    // skipped, it would stay the newest and have the checkpoints of the
    // resumed run pruned. A reader reads the newest there is.
    std::os::unix::fs::symlink(dir.join("moved-away"), &unreadable).unwrap();
    let error = load_latest(&dir).unwrap_err().to_string();
    assert!(
        error.contains(&file_name(300)) && error.contains("remove the link"),
        "{error}"
    );
    assert!(
        load_latest_to_read(&dir)
            .unwrap_err()
            .to_string()
            .contains("is damaged")
    );
    fs::remove_file(&unreadable).unwrap();
    // The oldest, the newest (flipped, not set aside: only reading),
    // the one set aside, and the floor.
    assert_eq!(clear(&dir).unwrap(), 4);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    assert_eq!(read_version_floor(&dir).unwrap(), 0);
    assert!(load_latest(&dir).unwrap().is_none());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_state_no_learner_writes_is_refused_naming_the_field() {
    let good = CheckpointState {
        step: 100,
        trained_transitions: 32_000,
        adam_steps: 101,
        objective_adam_steps: 100,
        wall_s: 1.5,
        ..CheckpointState::default()
    };
    assert_eq!(good.check(), Ok(()));
    let refused = |change: fn(&mut CheckpointState)| {
        let mut state = good.clone();
        change(&mut state);
        state.check().unwrap_err()
    };
    for (error, field) in [
        (refused(|s| s.step = u64::MAX), "`step`"),
        (
            refused(|s| s.trained_transitions = u64::MAX - 5),
            "`trained_transitions`",
        ),
        (
            refused(|s| s.evaluator.samples_so_far = 1 << 63),
            "`evaluator.samples_so_far`",
        ),
        (refused(|s| s.adam_steps = u64::MAX), "`adam_steps`"),
        (
            refused(|s| s.objective_adam_steps = 1 << 63),
            "`objective_adam_steps`",
        ),
        (
            refused(|s| s.totals.skipped_batches = u64::MAX),
            "`totals.skipped_batches`",
        ),
        (refused(|s| s.wall_s = f64::NAN), "`wall_s`"),
        (refused(|s| s.wall_s = -1.0), "`wall_s`"),
        (
            refused(|s| s.time_to_quality_s = Some(-5.0)),
            "`time_to_quality_s`",
        ),
        (
            refused(|s| s.totals.waiting_s = f64::INFINITY),
            "`totals.waiting_s`",
        ),
        (
            refused(|s| s.totals.lag_weighted = -1.0),
            "`totals.lag_weighted`",
        ),
        (
            refused(|s| s.evaluator.best = vec![(f64::NAN, vec![1])]),
            "`evaluator.best`",
        ),
        (
            refused(|s| {
                s.sound_through = SoundThrough::Step(101);
            }),
            "`sound_through`",
        ),
    ] {
        assert!(error.contains(field), "{field}: {error}");
    }
}

/// A checkpoint's step is read only from the name the learner writes: a
/// name made by hand for the same step (unpadded, signed) is no second
/// checkpoint of it.
#[test]
fn only_the_written_name_counts_as_a_checkpoint() {
    for step in [0, 5, 999_999_999_999, 1_000_000_000_000, u64::MAX] {
        assert_eq!(named_step(&file_name(step)), Some(step));
    }
    for name in [
        "ckpt-5.safetensors",
        "ckpt-+00000000005.safetensors",
        "ckpt-0000000000005.safetensors",
        "ckpt-000000000005.safetensors.tmp",
    ] {
        assert_eq!(named_step(name), None, "{name}");
    }
}
