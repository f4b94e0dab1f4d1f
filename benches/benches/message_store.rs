//! chat-core's store on both backends: appending a message (one transaction: next seq, membership,
//! insert), a group commit of 64 appends (what the writer does under load), and replaying a
//! 500-message page from a cursor. PostgreSQL runs when `COURIER_TEST_DATABASE_URL` is set (schema
//! `chat_bench`, recreated).

use std::sync::atomic::{AtomicU64, Ordering};

use chat_core::{Effect, Store, Write};
use criterion::{Criterion, criterion_group, criterion_main};
use types::{ConversationId, DeviceId, UserId};

struct Fixture {
    conversation: ConversationId,
    alice: UserId,
    phone: DeviceId,
}

async fn prepare(store: &Store) -> Fixture {
    let (alice, bob): (UserId, UserId) = ("alice".parse().unwrap(), "bob".parse().unwrap());
    let conversation = store.direct(&alice, &bob).await.unwrap().id;
    let phone = store.add_device(&alice, "phone").await.unwrap().device;
    for n in 0..1000 {
        store
            .append(&conversation, &alice, &phone, &format!("seed{n}"), "{\"text\":\"hello there\"}", 0)
            .await
            .unwrap();
    }
    Fixture { conversation, alice, phone }
}

fn bench_store(c: &mut Criterion, name: &str, runtime: &tokio::runtime::Runtime, store: Store) {
    let fixture = runtime.block_on(prepare(&store));
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group(format!("message_store/{name}"));
    group.bench_function("append", |b| {
        b.to_async(runtime).iter(|| async {
            let client_id = format!("bench{}", next.fetch_add(1, Ordering::Relaxed));
            let f = &fixture;
            store
                .append(&f.conversation, &f.alice, &f.phone, &client_id, "{\"text\":\"hello there\"}", 0)
                .await
                .unwrap()
        })
    });
    let batch = || -> Vec<Write> {
        (0..64)
            .map(|_| Write::Append {
                conversation: fixture.conversation,
                sender: fixture.alice.clone(),
                device: fixture.phone,
                client_id: format!("bench{}", next.fetch_add(1, Ordering::Relaxed)),
                body: "{\"text\":\"hello there\"}".into(),
                now_ms: 0,
                push_delay_ms: None,
                effect: Effect::Ordinary,
            })
            .collect()
    };
    group.throughput(criterion::Throughput::Elements(64));
    group.bench_function("append_batch_64", |b| {
        b.to_async(runtime).iter(|| async { assert!(store.write_batch(batch()).await.iter().all(Result::is_ok)) })
    });
    group.throughput(criterion::Throughput::Elements(1));
    group.bench_function("replay_500", |b| {
        b.to_async(runtime).iter(|| async {
            let page = store.messages_after(&fixture.conversation, &fixture.alice, 100, 500).await.unwrap();
            assert_eq!(page.len(), 500);
        })
    });
    group.finish();
}

fn message_store(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // What `courier serve` opens: WAL, synchronous=FULL, one writer thread and read connections.
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let sqlite = runtime.block_on(Store::connect(&url)).unwrap();
    bench_store(c, "sqlite", &runtime, sqlite);

    if let Ok(url) = std::env::var("COURIER_TEST_DATABASE_URL") {
        let store = runtime.block_on(async {
            let admin = sqlx::PgPool::connect(&url).await.expect("COURIER_TEST_DATABASE_URL is set but unreachable");
            sqlx::query("DROP SCHEMA IF EXISTS chat_bench CASCADE").execute(&admin).await.unwrap();
            sqlx::query("CREATE SCHEMA chat_bench").execute(&admin).await.unwrap();
            let separator = if url.contains('?') { '&' } else { '?' };
            Store::connect(&format!("{url}{separator}options=-c%20search_path%3Dchat_bench")).await.unwrap()
        });
        bench_store(c, "postgres", &runtime, store);
    }
}

criterion_group!(benches, message_store);
criterion_main!(benches);
