//! Replays the saved inputs of every fuzz target: the seed corpus (`fuzz/corpus/<target>/`)
//! and the inputs that once crashed (`fuzz/regressions/<target>/`, one file per bug fixed).
//! A corpus folder that is missing or empty fails the test rather than passing silently.

use std::path::{Path, PathBuf};

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (every target has this folder)", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a folder entry").path())
        // Dotfiles keep a folder in git; they are not inputs.
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    // libFuzzer aborts on any panic, including one in a spawned task or thread that would
    // otherwise be caught and dropped: do the same here.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::abort();
    }));
    let (_, run) = sov_fuzz_targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a target of that name");
    let corpus = inputs("corpus", target);
    assert!(!corpus.is_empty(), "fuzz/corpus/{target}/ holds no input");
    for file in corpus.iter().chain(&inputs("regressions", target)) {
        eprintln!("{}", file.display());
        run(&std::fs::read(file).expect("reading an input"));
    }
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name));
            }
        )*

        #[test]
        fn every_target_is_replayed() {
            let mut tested = vec![$(stringify!($name)),*];
            let mut all: Vec<&str> = sov_fuzz_targets::TARGETS.iter().map(|(n, _)| *n).collect();
            tested.sort_unstable();
            all.sort_unstable();
            assert_eq!(tested, all);
            for name in all {
                let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(format!("../fuzz/fuzz_targets/{name}.rs"));
                assert!(bin.is_file(), "{} is missing", bin.display());
            }
        }
    };
}

replay_tests!(
    nbd_session,
    nbd_transmission,
    vhost_user_messages,
    virtio_descriptors,
    chunk_record,
    segment_recovery,
    extent_meta,
    config_files,
    s3_request,
    s3_http,
);
