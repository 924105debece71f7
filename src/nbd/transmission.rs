//! The transmission phase. A connection is served by up to CONNECTION_WORKER_THREADS
//! threads. One of them at a time is the reader: it reads requests (a WRITE's payload
//! with its header). A request that may take long (READ, FLUSH, a large or FUA write) it
//! serves itself after handing the read side to a parked worker (or a new one, started as
//! the client's queue depth needs them), so requests run concurrently and replies may come
//! out of order, as the spec allows. Workers that finish a request park until they are
//! handed the read side.
//!
//! Quick writes (small WRITEs, WRITE_ZEROES and TRIMs without FUA) the reader serves in
//! place and reads on. Writes to one image take turns at its log anyway, so running them on
//! several threads only adds a hand-off (a futex wake and a context switch) per request;
//! served in place, a stream of them costs no thread switch, and the socket is read and
//! replied to in batches (see `ReadSide`, `WriteSide`). A quick write the engine makes wait
//! (a transaction's write lock, throttling or pacing, see `Session::write`) must not hold up
//! the requests behind it: a parked worker watches, and takes the read side over from a
//! reader stuck in place for READER_STUCK (see `park`); while several of the last quick
//! writes were slow, they are handed off like the rest (`Conn::serve_in_place`).
//!
//! Invalid requests get an error reply (a WRITE's payload is drained first); only a bad
//! request magic or an I/O failure ends the connection.

use super::consts::*;
use super::stream::Stream;
use super::{errno_for, Export, TxnCommand};
use crate::limits::{
    CONNECTION_IN_FLIGHT_BYTES_MAX, CONNECTION_WORKER_THREADS, REQUEST_PAYLOAD_BYTES_MAX,
};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const REQUEST_SIZE: usize = 28;
pub const SIMPLE_REPLY_SIZE: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn parse_request(b: &[u8; REQUEST_SIZE]) -> Option<Request> {
    if u32::from_be_bytes(b[0..4].try_into().unwrap()) != NBD_REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
        kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    })
}

pub fn simple_reply_header(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_SIZE] {
    let mut h = [0u8; SIMPLE_REPLY_SIZE];
    h[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// Checks a request against the export size and our limits. `Err` is the NBD error to reply.
pub fn validate(r: &Request, size: u64) -> Result<(), u32> {
    let allowed_flags = match r.kind {
        NBD_CMD_READ => NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE | NBD_CMD_TRIM => NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        NBD_CMD_FLUSH | NBD_CMD_DISC => 0,
        NBD_CMD_MVPS_COMMIT_TXN => NBD_CMD_FLAG_FUA,
        NBD_CMD_MVPS_BEGIN_TXN | NBD_CMD_MVPS_ROLLBACK_TXN | NBD_CMD_MVPS_LOCK_TXN => 0,
        _ => return Err(NBD_EINVAL),
    };
    if r.flags & !allowed_flags != 0 {
        return Err(NBD_EINVAL);
    }
    let len = r.length as u64;
    let in_range = r.offset.checked_add(len).is_some_and(|end| end <= size);
    match r.kind {
        NBD_CMD_READ | NBD_CMD_WRITE if r.length > REQUEST_PAYLOAD_BYTES_MAX => Err(NBD_EOVERFLOW),
        NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES if !in_range => Err(NBD_ENOSPC),
        NBD_CMD_READ | NBD_CMD_TRIM if !in_range => Err(NBD_EINVAL),
        _ => Ok(()),
    }
}

/// What one connection holds in flight: the request count (for the transaction barrier) and
/// payload bytes (bounded). Only the worker holding the read side ever waits on it.
struct InFlight {
    state: Mutex<InFlightState>,
    cv: Condvar,
}

struct InFlightState {
    count: usize,
    bytes: u64,
    /// Someone waits on `cv`: only then does `release` pay for a wake-up (a syscall).
    waiting: bool,
}

impl InFlight {
    fn new() -> InFlight {
        InFlight {
            state: Mutex::new(InFlightState {
                count: 0,
                bytes: 0,
                waiting: false,
            }),
            cv: Condvar::new(),
        }
    }
    fn acquire(&self, bytes: u64) {
        let mut g = self.state.lock().unwrap();
        // A single request larger than the byte budget still goes through, alone.
        while g.count > 0 && g.bytes + bytes > CONNECTION_IN_FLIGHT_BYTES_MAX {
            g.waiting = true;
            g = self.cv.wait(g).unwrap();
        }
        g.count += 1;
        g.bytes += bytes;
    }
    fn release(&self, bytes: u64) {
        let mut g = self.state.lock().unwrap();
        g.count -= 1;
        g.bytes -= bytes;
        if g.waiting {
            g.waiting = false;
            self.cv.notify_all();
        }
    }
    fn wait_idle(&self) {
        let mut g = self.state.lock().unwrap();
        while g.count > 0 {
            g.waiting = true;
            g = self.cv.wait(g).unwrap();
        }
    }
}

/// The socket's read side, held by one worker at a time while it reads one request.
struct ReadSide<'a> {
    /// Buffered: one receive takes in every request the client has sent so far (up to
    /// READ_BUFFER_BYTES), so at queue depth the next worker finds its request in memory
    /// instead of paying two receive calls (header, payload) for it.
    input: BufReader<&'a Stream>,
    /// The stream ended (EOF, DISC, bad magic or an error): workers then stop.
    ended: bool,
}

/// Who reads next, for workers that are not reading (see `park`).
#[derive(Default)]
struct Readers {
    /// Workers parked.
    parked: usize,
    /// Parked workers asked to take the read side, not yet answered.
    called: usize,
    /// Nobody reads: the next worker to finish a request takes the read side.
    free: bool,
    /// A parked worker watches the reader (with timed waits).
    watched: bool,
    /// The stream ended: workers stop.
    ended: bool,
}

struct Conn<'a> {
    export: Box<dyn Export>,
    /// The export's size, for validating requests.
    size: u64,
    out: WriteSide,
    in_flight: InFlight,
    /// Locked by the reader while it reads (never while it serves a request).
    reading: Mutex<ReadSide<'a>>,
    /// Counts the requests the reader served in place: odd while it serves one. A worker
    /// taking over from a stuck reader moves it on (`park`), so the reader knows.
    in_place: AtomicU64,
    /// The parked workers, and who reads next.
    readers: Mutex<Readers>,
    /// Parked workers other than the watcher wait on this,
    parked_cv: Condvar,
    /// the watcher on this.
    watcher_cv: Condvar,
    /// The watching worker sleeps without a timeout (no request served in place for a
    /// while); the reader wakes it when it serves in place again.
    watcher_idle: AtomicBool,
    /// A worker was started to watch the reader (the first time one served in place).
    watcher_started: AtomicBool,
    workers: AtomicUsize,
    /// The connection thread's name; workers are named after it.
    thread_name: String,
    /// The last quick writes, newest in bit 0: 1 for one that took longer than
    /// QUICK_WRITE_MAX.
    slow_writes: AtomicU32,
    /// The first I/O error that ended the connection.
    failure: Mutex<Option<io::Error>>,
}

impl Conn<'_> {
    /// A write the worker holding the read side may serve in place (module comment).
    fn quick_write(&self, r: &Request) -> bool {
        let small = match r.kind {
            NBD_CMD_WRITE => r.length <= QUICK_WRITE_BYTES_MAX,
            NBD_CMD_WRITE_ZEROES | NBD_CMD_TRIM => true,
            _ => false,
        };
        small && r.flags & NBD_CMD_FLAG_FUA == 0
    }
    /// Whether the worker holding the read side serves `r` itself and reads on: a quick
    /// write, unless the engine is making writes wait, seen as several of the last
    /// QUICK_WRITE_HISTORY having been slow. One slow write in a while is not that: a
    /// thread preempted on a busy machine, or another connection's write in turn before it.
    fn serve_in_place(&self, r: &Request) -> bool {
        let recent = self.slow_writes.load(Ordering::Relaxed) & ((1 << QUICK_WRITE_HISTORY) - 1);
        self.quick_write(r) && recent.count_ones() < QUICK_WRITE_SLOW_MAX
    }
    /// Serves a quick write (in place or not), timing it for `serve_in_place`.
    fn execute_timed(&self, r: &Request, buf: &mut Vec<u8>) {
        let t0 = Instant::now();
        execute(self, r, buf);
        let slow = u32::from(t0.elapsed() > QUICK_WRITE_MAX);
        let _ = self
            .slow_writes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h << 1 | slow)
            });
    }

    /// Hands the read side to a parked worker, or a new one; if there is none, it is free
    /// for the first worker to finish a request. True if a worker reads now.
    fn hand_over_read_side<'s>(&'s self, scope: &'s std::thread::Scope<'s, '_>) -> bool {
        if self.call_parked(false) || start_worker(scope, self, true) {
            return true;
        }
        // (A worker may have parked meanwhile.)
        self.call_parked(true)
    }
    /// Asks a parked worker to read: one other than the watcher if there is one (see
    /// `park`). False if none is parked (and not asked already); then, if `or_free`, the
    /// read side is left free.
    fn call_parked(&self, or_free: bool) -> bool {
        let mut g = self.readers.lock().unwrap();
        if g.parked <= g.called {
            g.free |= or_free;
            return false;
        }
        g.called += 1;
        let cv = if g.parked - usize::from(g.watched) >= g.called {
            &self.parked_cv
        } else {
            &self.watcher_cv
        };
        // (Woken after the lock is let go, the worker does not block on it at once.)
        drop(g);
        cv.notify_one();
        true
    }
    /// The stream ended: parked workers stop, and replies go out at once from now on.
    fn end_readers(&self) {
        self.readers.lock().unwrap().ended = true;
        self.parked_cv.notify_all();
        self.watcher_cv.notify_all();
        self.hold_replies(false);
    }
    fn wake_watcher(&self) {
        self.watcher_idle.store(false, Ordering::Release);
        let _g = self.readers.lock().unwrap();
        self.watcher_cv.notify_one();
    }

    /// Sends a reply without payload.
    fn reply(&self, header: &[u8]) {
        self.reply_with_payload(header, header.len());
    }
    /// Sends a reply whose first `header_len` bytes are its header and the rest its payload.
    fn reply_with_payload(&self, reply: &[u8], header_len: usize) {
        if let Err(e) = self.out.send(reply, header_len) {
            log::debug!("{}: reply not sent: {e}", self.export.label());
        }
    }
    /// Sets whether replies may be held back for a batch (WriteSide::hold).
    fn hold_replies(&self, deferrable: bool) {
        if let Err(e) = self.out.hold(deferrable) {
            log::debug!("{}: replies not sent: {e}", self.export.label());
        }
    }
    fn reply_error(&self, r: &Request, err: u32) {
        log::debug!(
            "{}: {} offset {} length {}: {}",
            self.export.label(),
            name_of_cmd(r.kind),
            r.offset,
            r.length,
            name_of_error(err)
        );
        self.reply(&simple_reply_header(err, r.cookie));
    }
}

/// The socket's write side. A reply is queued, and sent by whichever worker finds no send in
/// progress: that worker also sends what others queued meanwhile, and no worker sleeps
/// waiting for another's send. While the worker holding the read side has more requests
/// in its buffer, replies wait in the queue (up to REPLY_BATCH_MAX of them): that worker,
/// or the next one, sends them before the read side waits for the client (see `hold`), so
/// replies leave in batches and the client wakes once per batch, not per request. Large
/// replies are sent from their own buffer, not copied: their worker waits for the send in
/// progress, if any.
struct WriteSide {
    stream: Stream,
    state: Mutex<Outbox>,
    /// Signalled when a send ends, for a large reply waiting to send.
    idle: Condvar,
}

struct Outbox {
    queued: Vec<u8>,
    /// Replies in `queued`.
    count: usize,
    /// A worker is sending; it sends `queued` before it stops.
    sending: bool,
    /// Replies may wait in `queued`: the read side has requests buffered, so a worker
    /// will be back at it soon and send them (`WriteSide::hold`).
    deferrable: bool,
    /// Large replies waiting for `sending` to end: only then does a send end with a wake-up.
    waiting: usize,
    /// The buffer of the last batch sent, kept for reuse (if small).
    spare: Vec<u8>,
}

impl WriteSide {
    fn new(stream: Stream) -> WriteSide {
        WriteSide {
            stream,
            state: Mutex::new(Outbox {
                queued: Vec::new(),
                count: 0,
                sending: false,
                deferrable: false,
                waiting: 0,
                spare: Vec::new(),
            }),
            idle: Condvar::new(),
        }
    }

    /// Sends `reply` (its first `header_len` bytes are its header) now, or queues it for a
    /// worker sending already or soon. An error is the first one seen while this call sent.
    fn send(&self, reply: &[u8], header_len: usize) -> io::Result<()> {
        let mut g = self.state.lock().unwrap();
        if reply.len() < REPLY_QUEUED_MAX_BYTES {
            g.queued.extend_from_slice(reply);
            g.count += 1;
            if g.sending || (g.deferrable && g.count < REPLY_BATCH_MAX) {
                return Ok(());
            }
            g.sending = true;
            return self.send_queued(g);
        }
        while g.sending {
            g.waiting += 1;
            g = self.idle.wait(g).unwrap();
            g.waiting -= 1;
        }
        g.sending = true;
        // Replies queued before this one go first (any order is allowed; this keeps it fair).
        let before = std::mem::take(&mut g.queued);
        g.count = 0;
        drop(g);
        let first = { &self.stream }.write_all(&before);
        let sent = self.stream.write_all_header_corked(reply, header_len);
        let rest = self.send_queued(self.state.lock().unwrap());
        first.and(sent).and(rest)
    }

    /// Says whether replies may wait in the queue from now on (`deferrable`: a worker will be
    /// back at the read side without waiting for the client); if not, sends what is queued.
    fn hold(&self, deferrable: bool) -> io::Result<()> {
        let mut g = self.state.lock().unwrap();
        g.deferrable = deferrable;
        if deferrable {
            return Ok(());
        }
        self.send_if_queued(g)
    }

    fn send_if_queued<'a>(&'a self, mut g: MutexGuard<'a, Outbox>) -> io::Result<()> {
        if g.sending || g.queued.is_empty() {
            return Ok(());
        }
        g.sending = true;
        self.send_queued(g)
    }

    /// Sends everything queued until nothing is, then ends the send in progress (which the
    /// caller started).
    fn send_queued<'a>(&'a self, mut g: MutexGuard<'a, Outbox>) -> io::Result<()> {
        let mut result = Ok(());
        while !g.queued.is_empty() {
            let spare = std::mem::take(&mut g.spare);
            let batch = std::mem::replace(&mut g.queued, spare);
            g.count = 0;
            drop(g);
            let sent = { &self.stream }.write_all(&batch);
            if result.is_ok() {
                result = sent;
            }
            g = self.state.lock().unwrap();
            if batch.capacity() <= REPLY_QUEUED_MAX_BYTES * 4 {
                g.spare = batch;
                g.spare.clear();
            }
        }
        g.sending = false;
        if g.waiting > 0 {
            self.idle.notify_all();
        }
        result
    }
}

/// Replies shorter than this are copied into the connection's reply queue (see WriteSide);
/// larger ones are sent from the worker's buffer, after their header is queued with MSG_MORE
/// (on TCP), as two writes. Measured on loopback with fio's NBD engine
/// (docs/PERFORMANCE.md): 1 MiB reads ran ~1.5x faster so, the reader waking up half as
/// often per MiB; at 256 KiB +10 %; at 32 KiB and 4 KiB the extra call cost 5-10 %.
const REPLY_QUEUED_MAX_BYTES: usize = 64 << 10;

/// Most replies that wait in the queue for more (see WriteSide): bounds the delay a batch
/// adds to the first reply in it.
const REPLY_BATCH_MAX: usize = 16;

/// Largest WRITE served in place by the worker holding the read side (module comment):
/// larger ones take long enough that reading the next request on another thread meanwhile
/// pays for the hand-off.
const QUICK_WRITE_BYTES_MAX: u32 = 16 << 10;

/// A quick write that took longer than this (wall time) was slow: pacing sleeps at least
/// 100 µs per write (`engine::session::PACE_STEP_US`), throttling milliseconds; a 16 KiB
/// write normally takes 5-20 µs.
const QUICK_WRITE_MAX: Duration = Duration::from_micros(80);

/// Writes are handed off to other workers (served side by side, so that writes the engine
/// makes wait, wait together, not in turn) while at least QUICK_WRITE_SLOW_MAX of the last
/// QUICK_WRITE_HISTORY quick writes were slow. Measured under a load average of 9 on two
/// cores: about 2 % of 4 KiB writes took longer than QUICK_WRITE_MAX, one at a time.
const QUICK_WRITE_HISTORY: u32 = 8;
const QUICK_WRITE_SLOW_MAX: u32 = 3;

/// How often the watching worker looks at a reader serving a request in place; one stuck
/// on a request from one look to the next (READER_STUCK..2 x READER_STUCK) loses the read
/// side to it. Quick writes take microseconds; pacing sleeps up to 1 ms.
const READER_STUCK: Duration = Duration::from_millis(2);

/// The watching worker stops its timed waits (500 a second) after no request was served in
/// place for this long.
const READER_WATCH_IDLE: Duration = Duration::from_millis(100);

/// Largest buffer a worker keeps between requests (bigger ones are freed after use). It
/// holds a WRITE's payload or a READ's reply; reusing it saves a page fault per 4 KiB.
const WORKER_BUFFER_KEEP_BYTES: usize = 4 << 20;

/// Capacity of a connection's read buffer: a queue depth of 32 requests of 4 KiB with their
/// headers fits about twice. A WRITE payload at least this large bypasses it (read straight
/// into the worker's buffer, one copy).
const READ_BUFFER_BYTES: usize = 256 << 10;

/// The part of a WRITE's payload not in the read buffer yet is read straight from the
/// socket from this size up (see `read_payload`).
const PAYLOAD_DIRECT_MIN_BYTES: usize = 64 << 10;

/// Serves requests until the client disconnects, sends NBD_CMD_DISC, or breaks framing.
/// Returns after every request read has been replied to.
pub fn serve(input: &Stream, output: Stream, export: Box<dyn Export>) -> io::Result<()> {
    let conn = Conn {
        size: export.info().size,
        export,
        out: WriteSide::new(output),
        in_flight: InFlight::new(),
        reading: Mutex::new(ReadSide {
            input: BufReader::with_capacity(READ_BUFFER_BYTES, input),
            ended: false,
        }),
        in_place: AtomicU64::new(0),
        readers: Mutex::new(Readers::default()),
        parked_cv: Condvar::new(),
        watcher_cv: Condvar::new(),
        watcher_idle: AtomicBool::new(false),
        watcher_started: AtomicBool::new(false),
        workers: AtomicUsize::new(1),
        thread_name: std::thread::current().name().unwrap_or("conn").to_string(),
        slow_writes: AtomicU32::new(0),
        failure: Mutex::new(None),
    };
    // The scope joins every worker: all replies are sent when it ends.
    std::thread::scope(|scope| worker(scope, &conn, true));
    match conn.failure.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What the worker holding the read side got from the stream.
enum Next {
    /// A request to serve (its payload, if a WRITE, is in the worker's buffer).
    Serve(Request),
    /// Handled already (an error reply, a transaction command).
    Handled,
    /// The stream ended; an error is kept for `serve` to return.
    End(Option<io::Error>),
}

/// A worker: the reader if `reading`, else it parks first.
fn worker<'s, 'a: 's>(scope: &'s std::thread::Scope<'s, '_>, conn: &'s Conn<'a>, reading: bool) {
    let mut buf: Vec<u8> = Vec::new();
    let mut reading = reading;
    loop {
        if !reading && !park(conn) {
            return;
        }
        reading = false;
        let mut side = conn.reading.lock().unwrap();
        // Reads on while the requests are quick writes, served in place (module comment).
        let next = loop {
            if side.ended {
                return;
            }
            let r = match read_request(&mut side.input, conn, &mut buf) {
                Next::Serve(r) => r,
                Next::Handled => continue,
                Next::End(e) => {
                    side.ended = true;
                    if let Some(e) = e {
                        *conn.failure.lock().unwrap() = Some(e);
                    }
                    conn.end_readers();
                    return;
                }
            };
            if !conn.serve_in_place(&r) {
                break Some((r, side));
            }
            if !conn.watcher_started.swap(true, Ordering::AcqRel) {
                // A worker to watch the reader (module comment).
                start_worker(scope, conn, false);
            }
            drop(side);
            let n = conn.in_place.fetch_add(1, Ordering::AcqRel) + 1;
            if conn.watcher_idle.load(Ordering::Acquire) {
                conn.wake_watcher();
            }
            conn.execute_timed(&r, &mut buf);
            conn.in_flight.release(in_flight_bytes(&r));
            let taken_over = conn
                .in_place
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err();
            if taken_over {
                break None;
            }
            side = conn.reading.lock().unwrap();
        };
        let Some((r, side)) = next else { continue };
        drop(side);
        if !conn.hand_over_read_side(scope) {
            // Nobody reads until a worker is free: the replies held back cannot wait.
            conn.hold_replies(false);
        }
        if conn.quick_write(&r) {
            conn.execute_timed(&r, &mut buf);
        } else {
            execute(conn, &r, &mut buf);
        }
        conn.in_flight.release(in_flight_bytes(&r));
        if buf.capacity() > WORKER_BUFFER_KEEP_BYTES {
            buf = Vec::new();
        }
    }
}

/// Parks a worker that is not reading until it is to read (true) or the stream ended
/// (false). A worker finds the read side free, is handed it (`hand_over_read_side`), or
/// takes it over: one parked worker, the watcher, looks at the reader every READER_STUCK
/// and takes over from a reader that has served the same request in place since its last
/// look. Once no request was served in place for READER_WATCH_IDLE, the watcher sleeps
/// until one is. The watcher answers a call only when no other parked worker can, so the
/// watch goes on while workers come and go.
fn park(conn: &Conn) -> bool {
    let mut g = conn.readers.lock().unwrap();
    g.parked += 1;
    let mut watching = false;
    let mut idle_since = Instant::now();
    let mut seen = 0;
    let to_read = loop {
        if g.ended {
            break false;
        }
        if g.called > 0 && (!watching || g.called >= g.parked) {
            g.called -= 1;
            break true;
        }
        if g.free {
            g.free = false;
            break true;
        }
        if !watching && !g.watched {
            watching = true;
            g.watched = true;
            seen = conn.in_place.load(Ordering::Acquire);
            idle_since = Instant::now();
        }
        if !watching {
            g = conn.parked_cv.wait(g).unwrap();
            continue;
        }
        if conn.watcher_idle.load(Ordering::Acquire) {
            g = conn.watcher_cv.wait(g).unwrap();
            continue;
        }
        g = conn.watcher_cv.wait_timeout(g, READER_STUCK).unwrap().0;
        let now = conn.in_place.load(Ordering::Acquire);
        if now != seen {
            seen = now;
            idle_since = Instant::now();
        } else if now % 2 == 1 {
            // The same request, served in place since the last look: take over.
            let took = conn
                .in_place
                .compare_exchange(now, now + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if took {
                log::debug!(
                    "{}: a request served in place takes long; another worker reads on",
                    conn.export.label()
                );
                break true;
            }
        } else if idle_since.elapsed() >= READER_WATCH_IDLE {
            conn.watcher_idle.store(true, Ordering::Release);
        }
    };
    if watching {
        g.watched = false;
    }
    g.parked -= 1;
    to_read
}

/// Starts one more worker for this connection (the reader if `reading`), if it has fewer
/// than the limit. False if none was started.
fn start_worker<'s, 'a: 's>(
    scope: &'s std::thread::Scope<'s, '_>,
    conn: &'s Conn<'a>,
    reading: bool,
) -> bool {
    let n = conn.workers.fetch_add(1, Ordering::AcqRel);
    if n >= CONNECTION_WORKER_THREADS {
        conn.workers.fetch_sub(1, Ordering::AcqRel);
        return false;
    }
    let name = format!("{}-w{n}", conn.thread_name);
    let spawned = std::thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, move || worker(scope, conn, reading));
    if let Err(e) = spawned {
        conn.workers.fetch_sub(1, Ordering::AcqRel);
        log::warn!("{}: cannot start a worker thread: {e}", conn.export.label());
        return false;
    }
    true
}

fn in_flight_bytes(r: &Request) -> u64 {
    if matches!(r.kind, NBD_CMD_READ | NBD_CMD_WRITE) {
        r.length as u64
    } else {
        0
    }
}

/// Reads one request (and a WRITE's payload into `buf`). Called with the read side held.
fn read_request(input: &mut BufReader<&Stream>, conn: &Conn, buf: &mut Vec<u8>) -> Next {
    if input.buffer().len() < REQUEST_SIZE {
        // About to wait for the client, who may be waiting for the replies held back.
        conn.hold_replies(false);
    }
    let mut h = [0u8; REQUEST_SIZE];
    match input.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Next::End(None),
        Err(e) => return Next::End(Some(e)),
    }
    let Some(r) = parse_request(&h) else {
        log::warn!(
            "{}: bad request magic; closing the connection",
            conn.export.label()
        );
        return Next::End(None);
    };
    if r.kind == NBD_CMD_WRITE && input.buffer().len() < r.length as usize {
        conn.hold_replies(false);
    }
    if let Err(err) = validate(&r, conn.size) {
        if r.kind == NBD_CMD_WRITE {
            if let Err(e) = io::copy(&mut input.take(r.length as u64), &mut io::sink()) {
                return Next::End(Some(e));
            }
        }
        conn.reply_error(&r, err);
        return Next::Handled;
    }
    if r.kind == NBD_CMD_DISC {
        return Next::End(None);
    }
    if let Some(cmd) = txn_command(r.kind) {
        // A barrier: everything read before it has been executed, and nothing after it is
        // read until it is done (this worker keeps the read side meanwhile), so a
        // transaction contains exactly the writes between its BEGIN and COMMIT in stream
        // order. Its replies go out at once (the barrier may wait, the command take long).
        conn.hold_replies(false);
        conn.in_flight.wait_idle();
        execute_txn(conn, &r, cmd);
        return Next::Handled;
    }
    conn.in_flight.acquire(in_flight_bytes(&r));
    if r.kind == NBD_CMD_WRITE {
        let len = r.length as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        if let Err(e) = read_payload(input, &mut buf[..len]) {
            conn.in_flight.release(in_flight_bytes(&r));
            return Next::End(Some(e));
        }
    }
    // Read without waiting for the client again: replies may wait for a batch.
    conn.hold_replies(true);
    Next::Serve(r)
}

/// Reads a WRITE's payload: what the read buffer holds, then the rest, straight from the
/// socket if it is large (one copy), else through the buffer (one receive call also takes
/// in the requests after it).
fn read_payload(input: &mut BufReader<&Stream>, payload: &mut [u8]) -> io::Result<()> {
    let buffered = input.buffer();
    let have = buffered.len().min(payload.len());
    payload[..have].copy_from_slice(&buffered[..have]);
    input.consume(have);
    let rest = &mut payload[have..];
    if rest.len() >= PAYLOAD_DIRECT_MIN_BYTES {
        input.get_mut().read_exact(rest)
    } else {
        input.read_exact(rest)
    }
}

fn txn_command(kind: u16) -> Option<TxnCommand> {
    match kind {
        NBD_CMD_MVPS_BEGIN_TXN => Some(TxnCommand::Begin),
        NBD_CMD_MVPS_COMMIT_TXN => Some(TxnCommand::Commit),
        NBD_CMD_MVPS_ROLLBACK_TXN => Some(TxnCommand::Rollback),
        NBD_CMD_MVPS_LOCK_TXN => Some(TxnCommand::Lock),
        _ => None,
    }
}

fn execute_txn(conn: &Conn, r: &Request, cmd: TxnCommand) {
    let e = &conn.export;
    let mut result = e.transaction(cmd);
    if result.is_ok() && cmd == TxnCommand::Commit && r.flags & NBD_CMD_FLAG_FUA != 0 {
        result = e.flush();
    }
    match result {
        Ok(()) => conn.reply(&simple_reply_header(0, r.cookie)),
        Err(err) => {
            log::info!("{}: {}: {err}", e.label(), name_of_cmd(r.kind));
            conn.reply_error(r, errno_for(&err));
        }
    }
}

/// Serves request `r`; `buf` holds a WRITE's payload, or becomes a READ's reply.
fn execute(conn: &Conn, r: &Request, buf: &mut Vec<u8>) {
    let e = &conn.export;
    let fua = r.flags & NBD_CMD_FLAG_FUA != 0;
    let len = r.length as usize;
    let result = match r.kind {
        NBD_CMD_READ => {
            // Every byte is overwritten by the read (zero pieces are filled).
            if buf.len() < SIMPLE_REPLY_SIZE + len {
                buf.resize(SIMPLE_REPLY_SIZE + len, 0);
            }
            let reply = &mut buf[..SIMPLE_REPLY_SIZE + len];
            match e.read(r.offset, &mut reply[SIMPLE_REPLY_SIZE..]) {
                Ok(()) => {
                    reply[..SIMPLE_REPLY_SIZE].copy_from_slice(&simple_reply_header(0, r.cookie));
                    conn.reply_with_payload(reply, SIMPLE_REPLY_SIZE);
                    return;
                }
                Err(err) => Err(err),
            }
        }
        NBD_CMD_WRITE => e.write(r.offset, &buf[..len], fua),
        NBD_CMD_FLUSH => e.flush(),
        NBD_CMD_TRIM => e.trim(r.offset, r.length as u64, fua),
        NBD_CMD_WRITE_ZEROES => e.write_zeroes(
            r.offset,
            r.length as u64,
            r.flags & NBD_CMD_FLAG_NO_HOLE != 0,
            fua,
        ),
        _ => unreachable!("validate() admits only the commands above"),
    };
    match result {
        Ok(()) => conn.reply(&simple_reply_header(0, r.cookie)),
        Err(err) => {
            log::warn!("{}: {} failed: {err}", e.label(), name_of_cmd(r.kind));
            conn.reply_error(r, errno_for(&err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 1,
            offset,
            length,
        }
    }

    #[test]
    fn validation() {
        let size = 1 << 20;
        assert_eq!(validate(&req(NBD_CMD_READ, 0, 0, 4096), size), Ok(()));
        assert_eq!(
            validate(&req(NBD_CMD_READ, 0, size - 1, 2), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&req(NBD_CMD_READ, 0, u64::MAX, 2), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE, 0, size, 1), size),
            Err(NBD_ENOSPC)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE, 0, 0, (1 << 25) + 1), size),
            Err(NBD_EOVERFLOW)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE_ZEROES, 0, 0, u32::MAX), size),
            Err(NBD_ENOSPC)
        );
        assert_eq!(
            validate(&req(NBD_CMD_TRIM, 0, 0, u32::MAX), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(validate(&req(99, 0, 0, 0), size), Err(NBD_EINVAL));
        assert_eq!(
            validate(&req(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 1), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 1), size),
            Ok(())
        );
        assert_eq!(
            validate(&req(NBD_CMD_MVPS_BEGIN_TXN, 0, 0, 0), size),
            Ok(())
        );
        assert_eq!(
            validate(&req(NBD_CMD_MVPS_COMMIT_TXN, NBD_CMD_FLAG_FUA, 0, 0), size),
            Ok(())
        );
        assert_eq!(
            validate(&req(NBD_CMD_MVPS_LOCK_TXN, NBD_CMD_FLAG_FUA, 0, 0), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(validate(&req(68, 0, 0, 0), size), Err(NBD_EINVAL));
    }

    #[test]
    fn request_parse() {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!((r.kind, r.length), (NBD_CMD_WRITE, 512));
        b[0] = 0;
        assert!(parse_request(&b).is_none());
    }
}
