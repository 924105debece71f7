//! S3 image store (see issue: S3 image store).
