//! Round-trip time of one decode-sized activation frame between two QUIC endpoints on
//! loopback, in the two ways a stage can do its I/O:
//!
//! * `ct` (what stages do): each side is one thread that owns a current-thread runtime and
//!   its data endpoint, writing and reading the UDP socket itself;
//! * `mt` (the earlier design): each side is a plain thread calling `Handle::block_on` on a
//!   shared multi-threaded runtime, whose worker threads drive the endpoints, so every frame
//!   crosses threads on the way out and in.
//!
//!   cargo run --release -p potluck-node --example hop_latency [ROUNDS] [HIDDEN] [COMPUTE_US] [ct|mt] [ROWS] [f16|f32]
//!
//! ROWS (default 1, a decode step; up to a 512-row prefill chunk) rows of HIDDEN values of
//! that type (default f16) in one frame.
//!
//! COMPUTE_US spins that long on each side before it answers, as a stage computing its
//! layers would (idle CPUs take longer to wake); it is subtracted from the round trip.

use std::time::Instant;

use potluck_protocol::{Activations, Dtype, Message, Segment};
use potluck_node::net::framed::{FrameReader, FrameWriter};
use potluck_node::net::identity::NodeIdentity;
use potluck_node::net::tls::{self, Plane};

fn spin(us: u64) {
    let started = Instant::now();
    while started.elapsed().as_micros() < u128::from(us) {
        std::hint::spin_loop();
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(2000), |s| s.parse())?;
    let hidden: u32 = args.next().map_or(Ok(576), |s| s.parse())?;
    let compute_us: u64 = args.next().map_or(Ok(0), |s| s.parse())?;
    let mode = args.next().unwrap_or_else(|| "ct".into());
    let rows: u32 = args.next().map_or(Ok(1), |s| s.parse())?;
    let (dtype, element_bytes) = match args.next().as_deref() {
        None | Some("f16") => (Dtype::F16, 2),
        Some("f32") => (Dtype::F32, 4),
        Some(other) => anyhow::bail!("the activation type must be f16 or f32, not {other:?}"),
    };
    let shared = match mode.as_str() {
        "ct" => None,
        "mt" => Some(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?),
        other => anyhow::bail!("mode must be ct or mt, not {other:?}"),
    };
    tls::install_crypto_provider();
    let (a, b) = (NodeIdentity::generate(), NodeIdentity::generate());
    let a_id = a.node_id();
    // Each side: its own current-thread runtime (ct) or a handle on the shared one (mt).
    let side = |shared: &Option<tokio::runtime::Runtime>| -> anyhow::Result<(Option<tokio::runtime::Runtime>, tokio::runtime::Handle)> {
        Ok(match shared {
            Some(rt) => (None, rt.handle().clone()),
            None => {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let handle = rt.handle().clone();
                (Some(rt), handle)
            }
        })
    };
    let (echo_rt, echo_handle) = side(&shared)?;
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        let run = async {
            let server = tls::endpoint_for(Plane::Data, &a, "127.0.0.1:0".parse()?)?;
            address_tx.send(server.local_addr()?)?;
            let connection = server.accept().await.ok_or_else(|| anyhow::anyhow!("no connection"))?.await?;
            let (send, recv) = connection.accept_bi().await?;
            let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
            while let Some(m) = r.recv().await? {
                spin(compute_us);
                w.send(&m).await?;
            }
            anyhow::Ok(())
        };
        match &echo_rt {
            Some(rt) => rt.block_on(run),
            None => echo_handle.block_on(run),
        }
    });
    let address = address_rx.recv()?;
    let (rt, handle) = side(&shared)?;
    let block_on = |f: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + '_>>| match &rt {
        Some(rt) => rt.block_on(f),
        None => handle.block_on(f),
    };
    let client = {
        let _context = rt.as_ref().map(|rt| rt.enter());
        let _shared_context = shared.as_ref().map(|rt| rt.enter());
        tls::endpoint_for(Plane::Data, &b, "127.0.0.1:0".parse()?)?
    };
    let mut streams = None;
    block_on(Box::pin(async {
        let connection = tls::connect_on(Plane::Data, &client, &b, address, Some(&a_id)).await?;
        let (send, recv) = connection.open_bi().await?;
        streams = Some((FrameWriter::new(send), FrameReader::new(recv), connection));
        Ok(())
    }))?;
    let (mut w, mut r, _connection) = streams.expect("connected");
    let message = Message::Activations(Activations {
        step: 1,
        segments: vec![Segment { sequence_id: 1, first_position: 0, n_rows: rows, sample: true, allowed: None, draft: Vec::new() }],
        dtype,
        hidden,
        payload: vec![0; hidden as usize * rows as usize * element_bytes],
    });
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        spin(compute_us);
        let started = Instant::now();
        block_on(Box::pin(async {
            w.send(&message).await?;
            r.recv().await?.ok_or_else(|| anyhow::anyhow!("echo closed"))?;
            Ok(())
        }))?;
        times.push(started.elapsed().as_secs_f64() * 1e6 - compute_us as f64);
    }
    // Drive our side while the end of the stream goes out (in ct mode nothing else would).
    block_on(Box::pin(async {
        let _ = w.get_mut().finish();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        Ok(())
    }))?;
    let _ = echo.join();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    println!(
        "{mode}: round trip of a {}-byte activation frame ({rows} row(s) × {hidden}) over QUIC on loopback, {rounds} rounds, {compute_us} µs compute per side: \
         p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs",
        hidden as usize * rows as usize * element_bytes,
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    Ok(())
}
