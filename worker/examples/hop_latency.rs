//! Round-trip time of one decode-sized activation frame between two nodes on loopback,
//! through exactly the path a stage uses: a thread that writes and reads its QUIC streams
//! itself through the runtime's handle (as `join.rs`'s stage thread and the coordinator's
//! generation thread do). The hop cost per token a pipeline pays on top of compute.
//!
//!   cargo run --release -p potluck-worker --example hop_latency [ROUNDS] [HIDDEN]

use std::time::Instant;

use potluck_protocol::{Activations, Dtype, Message, Segment};
use potluck_worker::net::framed::{FrameReader, FrameWriter};
use potluck_worker::net::identity::NodeIdentity;
use potluck_worker::net::tls;

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(2000), |s| s.parse())?;
    let hidden: u32 = std::env::args().nth(2).map_or(Ok(576), |s| s.parse())?;
    tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let handle = runtime.handle().clone();
    let (a, b) = (NodeIdentity::generate(), NodeIdentity::generate());
    let (server, client) = runtime.block_on(async {
        let server = tls::endpoint(&a, "127.0.0.1:0".parse()?)?;
        let client = tls::endpoint(&b, "127.0.0.1:0".parse()?)?;
        anyhow::Ok((server, client))
    })?;
    let address = server.local_addr()?;
    let a_id = a.node_id();
    // Echo side: a plain thread, like a stage thread.
    let echo_handle = handle.clone();
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        echo_handle.block_on(async {
            let connection = server.accept().await.expect("incoming").await?;
            let (send, recv) = connection.accept_bi().await?;
            let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
            anyhow::Ok((w.get_mut().id(), ())).ok();
            while let Some(m) = r.recv().await? {
                w.send(&m).await?;
            }
            anyhow::Ok(())
        })
    });
    let connection = handle.block_on(tls::connect(&client, &b, address, Some(&a_id)))?;
    let (send, recv) = handle.block_on(connection.open_bi())?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    let message = Message::Activations(Activations {
        step: 1,
        segments: vec![Segment { sequence_id: 1, first_position: 0, n_rows: 1, sample: true }],
        dtype: Dtype::F16,
        hidden,
        payload: vec![0; hidden as usize * 2],
    });
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        handle.block_on(async {
            w.send(&message).await?;
            r.recv().await?.ok_or_else(|| anyhow::anyhow!("echo closed"))
        })?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let _ = w.get_mut().finish();
    drop(r);
    let _ = echo.join();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    println!(
        "round trip of a {}-byte activation frame over QUIC on loopback, {rounds} rounds: p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs",
        hidden * 2,
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    Ok(())
}
