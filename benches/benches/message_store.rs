//! chat-core's store on both backends: appending a message (one transaction: next seq, membership,
//! insert), a group commit of 64 appends (what the writer does under load; on SQLite also through
//! the blocking writer thread's connection, which is what the server uses), and replaying a
//! 500-message page from a cursor. PostgreSQL runs when
//! `COURIER_TEST_DATABASE_URL` is set (schema `chat_bench`, recreated).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use chat_core::{MessageStore, Write};
use criterion::{Criterion, criterion_group, criterion_main};
use types::{ConversationId, DeviceId, UserId};

struct Fixture {
    conversation: ConversationId,
    alice: UserId,
    phone: DeviceId,
}

async fn prepare<S: MessageStore>(store: &S) -> Fixture {
    let (alice, bob): (UserId, UserId) = ("alice".parse().unwrap(), "bob".parse().unwrap());
    let conversation = store.direct(&alice, &bob).await.unwrap().id;
    let phone = store.add_device(&alice, "phone").await.unwrap();
    for n in 0..1000 {
        store
            .append(&conversation, &alice, &phone, &format!("seed{n}"), "{\"text\":\"hello there\"}", 0)
            .await
            .unwrap();
    }
    Fixture { conversation, alice, phone }
}

fn bench_store<S: MessageStore + 'static>(c: &mut Criterion, name: &str, runtime: &tokio::runtime::Runtime, store: S) {
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
            })
            .collect()
    };
    group.throughput(criterion::Throughput::Elements(64));
    group.bench_function("append_batch_64", |b| {
        b.to_async(runtime).iter(|| async { assert!(store.write_batch(&batch()).await.iter().all(Result::is_ok)) })
    });
    // What `courier serve` runs on SQLite: the same batch on the writer thread's own connection.
    if let Some(mut writer) = store.blocking_writer() {
        group.bench_function("append_batch_64_blocking_writer", |b| {
            b.iter(|| assert!(writer.write_batch(&batch()).iter().all(Result::is_ok)))
        });
    }
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
    // The pool `courier serve` uses: WAL, synchronous=FULL, one connection.
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let sqlite = runtime.block_on(chat_core::open_sqlite(&url)).unwrap();
    bench_store(c, "sqlite", &runtime, sqlite);

    if let Ok(url) = std::env::var("COURIER_TEST_DATABASE_URL") {
        let pool = runtime.block_on(async {
            let admin = sqlx::PgPool::connect(&url).await.expect("COURIER_TEST_DATABASE_URL is set but unreachable");
            sqlx::query("DROP SCHEMA IF EXISTS chat_bench CASCADE").execute(&admin).await.unwrap();
            sqlx::query("CREATE SCHEMA chat_bench").execute(&admin).await.unwrap();
            let options =
                sqlx::postgres::PgConnectOptions::from_str(&url).unwrap().options([("search_path", "chat_bench")]);
            let pool = sqlx::PgPool::connect_with(options).await.unwrap();
            chat_core::migrate(&pool).await.unwrap();
            pool
        });
        bench_store(c, "postgres", &runtime, pool);
    }
}

criterion_group!(benches, message_store);
criterion_main!(benches);
