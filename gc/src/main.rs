//! mvps-s3-gc: one garbage-collection pass over an mvps image store (see `man
//! mvps-s3-gc`). Exit status: 0 done, 1 configuration error or failed deletes, 2 sanity
//! stop (nothing deleted) or a refused command line.

use mvps::config::{open_existing_store, ExistingStore};
use mvps::store::ImageStore;
use mvps_s3_gc::{pass, Options, ENV_PREFIX, EXIT_ERROR, EXIT_OK, EXIT_STOP, FLAGS};

fn open_store(o: &Options) -> Result<Box<dyn ImageStore>, String> {
    match (&o.bucket, &o.image_store_local_path) {
        (Some(_), Some(_)) => Err("give --bucket or --image-store-local-path, not both".into()),
        (None, None) => Err(
            "no image store: give --bucket (S3; credentials from AWS_* and S3_ENDPOINT) or \
             --image-store-local-path DIR"
                .into(),
        ),
        (None, Some(path)) => open_existing_store(ExistingStore::Local(std::path::Path::new(path))),
        (Some(bucket), None) => open_existing_store(ExistingStore::S3 {
            bucket,
            prefix: &o.prefix,
        }),
    }
}

fn main() {
    let o: Options = mvps::config::parse_or_exit(ENV_PREFIX, FLAGS);
    if let Err(e) = mvps::config::init_logging(&o.log_level) {
        eprintln!("mvps-s3-gc: {e}");
        std::process::exit(EXIT_ERROR);
    }
    let setup = mvps_s3_gc::policy(&o).and_then(|p| Ok((p, open_store(&o)?)));
    let (policy, store) = match setup {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mvps-s3-gc: {e}");
            std::process::exit(EXIT_ERROR);
        }
    };
    match pass::run(store.as_ref(), &policy, o.concurrency, o.dry_run) {
        Ok(s) => {
            println!("{}", s.line());
            if o.json {
                println!("{}", serde_json::to_string(&s).expect("summary serializes"));
            }
            std::process::exit(if s.errors == 0 { EXIT_OK } else { EXIT_ERROR });
        }
        Err(stop) => {
            eprintln!("mvps-s3-gc: {}: stopped: {stop}", store.describe());
            if o.json {
                let j =
                    serde_json::json!({ "store": store.describe(), "stopped": stop.to_string() });
                println!("{j}");
            }
            std::process::exit(EXIT_STOP);
        }
    }
}
