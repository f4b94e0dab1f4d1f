//! One conformance suite, run against both backends: SQLite in a temp file, and PostgreSQL at
//! `COURIER_TEST_DATABASE_URL` (each test in a schema of its own). With that variable set, an
//! unreachable server fails the PostgreSQL tests; without it they are skipped with a note.

use chat_core::{
    Appended, Change, CodeCheck, ConversationKind, Cursor, DELETE_WINDOW_MS, DELETED_BODY, EDIT_WINDOW_MS,
    EXPIRED_BODY, Effect, Flags, FlagsEdit, InfoChange, ListFrom, MAX_CODE_ATTEMPTS, MAX_GROUP_MEMBERS, Message,
    PageFrom, ProfileEdit, Role, Rotation, Spend, Store, StoreError, SyncState, Visibility, Write, Written,
};
use futures_util::future::join_all;
use types::{ConversationId, DeviceId, UserId};

fn user(name: &str) -> UserId {
    name.parse().unwrap()
}

async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("chat.db").display())).await.unwrap();
    (store, dir)
}

/// A store on a fresh schema of the test server, or `None` when no server is configured.
async fn postgres(test: &str) -> Option<Store> {
    let Ok(url) = std::env::var("COURIER_TEST_DATABASE_URL") else {
        eprintln!("COURIER_TEST_DATABASE_URL is not set: skipping the PostgreSQL run of {test}");
        return None;
    };
    let schema = format!("chat_{test}");
    let admin = sqlx::PgPool::connect(&url).await.expect("COURIER_TEST_DATABASE_URL is set but unreachable");
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&admin).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await.unwrap();
    admin.close().await;
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(Store::connect(&format!("{url}{separator}options=-c%20search_path%3D{schema}")).await.unwrap())
}

/// Declares each suite function as a test per backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let (store, _dir) = super::sqlite().await;
                    super::$name(store).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(store) = super::postgres(stringify!($name)).await {
                        super::$name(store).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    direct_conversations_exist_once_per_pair,
    seqs_are_gapless_under_concurrent_senders,
    a_retried_client_id_is_stored_once,
    history_pages_in_seq_order,
    history_pages_both_ways_from_where_the_member_joined,
    non_members_see_nothing,
    groups_have_admins_and_a_size_limit,
    cursors_only_move_forward_and_count_unread,
    devices_per_user_are_bounded,
    removing_a_device_takes_its_cursors_and_tokens,
    fanout_follows_membership,
    a_member_reads_from_when_they_joined,
    group_changes_are_system_messages_in_the_log,
    profiles_are_seen_as_their_owners_allow,
    the_chat_list_pages_pinned_then_by_activity_with_flags_per_user,
    presence_goes_to_contacts_and_to_answered_direct_chats,
    rate_limits_let_a_burst_through_then_one_per_interval,
    phones_are_discovered_in_one_call,
    a_link_request_is_answered_once_by_another_device_and_collected_once,
    push_intents_go_with_messages_to_the_devices_that_did_not_ack,
    reactions_edits_deletions_and_timers_are_checked_where_they_are_stored,
    retention_purges_old_messages_and_says_how_far,
    retention_cuts_a_prefix_of_the_log_in_slices,
    phone_codes_expire_and_lock,
    a_reused_refresh_token_logs_the_device_out,
    a_refresh_retried_within_the_grace_is_taken_again,
    a_batch_commits_what_succeeds_and_refuses_the_rest,
    crossed_batches_do_not_deadlock,
    linking_at_once_cannot_pass_the_device_limit,
    reads_see_what_was_just_written,
    a_code_verified_twice_at_once_is_used_once,
    cursors_stay_inside_the_log,
);

/// The right code sent twice at once (a double tap, or an attacker racing the owner) signs in once.
async fn a_code_verified_twice_at_once_is_used_once(store: Store) {
    let phone = "+4915112345678";
    store.put_code(phone, "right", 1_000, 0).await.unwrap();
    // As many as the attempts a code allows, so none is refused as one guess too many.
    let checks = (0..MAX_CODE_ATTEMPTS).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.check_code(phone, "right", 10).await.unwrap() })
    });
    let verdicts: Vec<CodeCheck> = join_all(checks).await.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(verdicts.iter().filter(|v| **v == CodeCheck::Valid).count(), 1, "{verdicts:?}");
    assert!(verdicts.iter().all(|v| matches!(v, CodeCheck::Valid | CodeCheck::Missing)), "{verdicts:?}");
}

/// An ack below zero or past the end of the log moves the cursor to the edge, never past it.
async fn cursors_stay_inside_the_log(store: Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = store.direct(&alice, &bob).await.unwrap();
    let phone = store.add_device(&alice, "phone").await.unwrap().device;
    let bobs = store.add_device(&bob, "phone").await.unwrap().device;
    store.append(&chat.id, &alice, &phone, "one", "{}", 1).await.unwrap();
    assert_eq!(store.ack(&bob, &bobs, &chat.id, -5).await.unwrap().device, Cursor { delivered: 0, read: 0 });
    assert_eq!(store.mark_read(&bob, &bobs, &chat.id, 99).await.unwrap().device, Cursor { delivered: 1, read: 1 });
    assert_eq!(store.ack(&bob, &bobs, &chat.id, 0).await.unwrap().device, Cursor { delivered: 1, read: 1 });
}

async fn devices_per_user_are_bounded(store: Store) {
    let alice = user("alice");
    let mut devices = Vec::new();
    for i in 0..chat_core::MAX_DEVICES {
        let linked = store.add_device(&alice, &format!("device {i}")).await.unwrap();
        assert_eq!(linked.replaced, None);
        devices.push(linked.device);
    }
    // Every device but the second is seen again: the second is the least recently seen.
    for device in devices.iter().filter(|d| **d != devices[1]) {
        store.device_seen(&alice, device).await.unwrap();
    }
    let linked = store.add_device(&alice, "one more").await.unwrap();
    assert_eq!(linked.replaced, Some(devices[1]), "the least recently seen device was not the one replaced");
    let listed: Vec<DeviceId> = store.devices(&alice).await.unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(listed.len() as i64, chat_core::MAX_DEVICES);
    assert!(!listed.contains(&devices[1]) && listed.contains(&linked.device));
    assert!(!store.device_exists(&alice, &devices[1]).await.unwrap());
    // Another user is not affected.
    store.add_device(&user("bob"), "phone").await.unwrap();
    assert_eq!(store.devices(&user("bob")).await.unwrap().len(), 1);
}

/// Many links of one user at once (a stolen token racing the owner, or a script): the count, the
/// replacement and the insert are one step, so the user never holds more than the limit.
async fn linking_at_once_cannot_pass_the_device_limit(store: Store) {
    let alice = user("alice");
    store.add_device(&alice, "first").await.unwrap();
    let links = (0..3 * chat_core::MAX_DEVICES).map(|i| {
        let (store, alice) = (store.clone(), alice.clone());
        tokio::spawn(async move { store.add_device(&alice, &format!("device {i}")).await })
    });
    let linked = join_all(links).await.into_iter().map(|r| r.unwrap().unwrap()).collect::<Vec<_>>();
    let replaced = linked.iter().filter(|l| l.replaced.is_some()).count() as i64;
    assert_eq!(replaced, 3 * chat_core::MAX_DEVICES + 1 - chat_core::MAX_DEVICES);
    assert_eq!(store.devices(&alice).await.unwrap().len() as i64, chat_core::MAX_DEVICES);
}

/// Reads may run on other connections than writes (SQLite's readers beside its writer): what a
/// write returned is visible to the next read.
async fn reads_see_what_was_just_written(store: Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let phone = store.add_device(&alice, "phone").await.unwrap().device;
    assert!(store.device_exists(&alice, &phone).await.unwrap());
    let chat = store.direct(&alice, &bob).await.unwrap();
    for n in 1..=50 {
        let sent = store.append(&chat.id, &alice, &phone, &format!("m{n}"), "{\"text\":\"hi\"}", 1).await.unwrap();
        let log = store.messages_after(&chat.id, &bob, n - 1, 10).await.unwrap();
        assert_eq!(log.first().map(|m| m.seq), Some(sent.message().seq));
        assert_eq!(store.sync_one(&bob, &phone, &chat.id).await.unwrap().last_seq, n);
    }
    assert!(store.remove_device(&alice, &phone).await.unwrap());
    assert!(!store.device_exists(&alice, &phone).await.unwrap());
}

async fn direct_conversations_exist_once_per_pair(store: Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let calls = (0..16).map(|i| {
        let store = store.clone();
        let (a, b) = if i % 2 == 0 { (alice.clone(), bob.clone()) } else { (bob.clone(), alice.clone()) };
        async move { store.direct(&a, &b).await.unwrap() }
    });
    let results = join_all(calls.map(tokio::spawn)).await;
    let ids: Vec<ConversationId> = results.into_iter().map(|r| r.unwrap().id).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one pair got several direct conversations");
    let conversation = store.direct(&alice, &bob).await.unwrap();
    assert_eq!(conversation.kind, ConversationKind::Direct);
    let members: Vec<UserId> =
        store.members(&conversation.id, &alice).await.unwrap().into_iter().map(|m| m.0).collect();
    assert_eq!(members.len(), 2);
    assert!(members.contains(&alice) && members.contains(&bob));
    assert!(matches!(store.direct(&alice, &alice).await, Err(StoreError::Invalid(_))));
    assert_ne!(store.direct(&alice, &user("carol")).await.unwrap().id, conversation.id);
}

async fn seqs_are_gapless_under_concurrent_senders(store: Store) {
    let senders: Vec<UserId> = (0..4).map(|i| user(&format!("sender{i}"))).collect();
    let group = store.create_group(&senders[0], "busy", &senders[1..]).await.unwrap();
    let mut tasks = Vec::new();
    for sender in &senders {
        let device = store.add_device(sender, "phone").await.unwrap().device;
        for n in 0..25 {
            let (store, sender, id) = (store.clone(), sender.clone(), group.id);
            tasks.push(tokio::spawn(async move {
                let appended =
                    store.append(&id, &sender, &device, &format!("m{n}"), "{\"text\":\"hi\"}", 1).await.unwrap();
                assert!(matches!(appended, Appended::New(_)));
                appended.message().seq
            }));
        }
    }
    let mut seqs: Vec<i64> = join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=100).collect::<Vec<i64>>(), "seqs have gaps or repeats");
    let all = store.messages_after(&group.id, &senders[0], 0, 500).await.unwrap();
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=100).collect::<Vec<i64>>());
}

async fn a_retried_client_id_is_stored_once(store: Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = store.direct(&alice, &bob).await.unwrap();
    let phone = store.add_device(&alice, "phone").await.unwrap().device;
    let first = store.append(&chat.id, &alice, &phone, "c-1", "{\"text\":\"one\"}", 10).await.unwrap();
    let Appended::New(first) = first else { panic!("the first send was not new") };
    assert_eq!(first.seq, 1);

    // The same client_id and body again, concurrently: the first result, never a copy.
    let retries = (0..8).map(|_| {
        let (store, alice, id) = (store.clone(), alice.clone(), chat.id);
        tokio::spawn(async move { store.append(&id, &alice, &phone, "c-1", "{\"text\":\"one\"}", 20).await.unwrap() })
    });
    for retry in join_all(retries).await {
        assert_eq!(retry.unwrap(), Appended::Duplicate(first.clone()));
    }
    // The same key with another body is not a retry: refused, nothing stored.
    let reused = store.append(&chat.id, &alice, &phone, "c-1", "{\"text\":\"changed\"}", 20).await;
    assert!(matches!(reused, Err(StoreError::ClientIdReused)), "{reused:?}");
    // Another device of the same user, or another sender, may use the same client_id: it is the
    // sending device's own key.
    let laptop = store.add_device(&alice, "laptop").await.unwrap().device;
    let from_laptop = store.append(&chat.id, &alice, &laptop, "c-1", "{\"text\":\"laptop\"}", 25).await.unwrap();
    assert!(matches!(from_laptop, Appended::New(ref m) if m.seq == 2), "{from_laptop:?}");
    let bobs = store.add_device(&bob, "phone").await.unwrap().device;
    let other = store.append(&chat.id, &bob, &bobs, "c-1", "{\"text\":\"bob\"}", 30).await.unwrap();
    assert_eq!(other.message().seq, 3, "a duplicate or a refusal used up a seq");
    assert_eq!(store.messages_after(&chat.id, &bob, 0, 100).await.unwrap().len(), 3);

    assert!(matches!(store.append(&chat.id, &alice, &phone, "", "{}", 1).await, Err(StoreError::Invalid(_))));
    let huge = format!("{{\"text\":\"{}\"}}", "x".repeat(chat_core::MAX_STORED_BODY_BYTES));
    assert!(matches!(store.append(&chat.id, &alice, &phone, "big", &huge, 1).await, Err(StoreError::Invalid(_))));
    assert_eq!(store.messages_after(&chat.id, &bob, 0, 100).await.unwrap().len(), 3);
}

async fn history_pages_in_seq_order(store: Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = store.direct(&alice, &bob).await.unwrap();
    let phone = store.add_device(&alice, "phone").await.unwrap().device;
    for n in 1..=30 {
        store.append(&chat.id, &alice, &phone, &format!("c{n}"), &format!("{{\"n\":{n}}}"), n).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store.messages_after(&chat.id, &bob, after, 7).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        after = page.last().unwrap().seq;
        seen.extend(page);
    }
    assert_eq!(seen.len(), 30);
    for (i, m) in seen.iter().enumerate() {
        assert_eq!(m.seq, i as i64 + 1);
        assert_eq!(m.body, format!("{{\"n\":{}}}", i + 1));
        assert_eq!(m.sender, alice);
        assert_eq!(m.device, phone);
    }
}

async fn history_pages_both_ways_from_where_the_member_joined(store: Store) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let device = store.add_device(&alice, "a").await.unwrap().device;
    let group = store.create_group(&alice, "g", std::slice::from_ref(&bob)).await.unwrap();
    for n in 1..=3 {
        store.append(&group.id, &alice, &device, &format!("c{n}"), "{}", n).await.unwrap();
    }
    store.add_members(&group.id, &alice, std::slice::from_ref(&carol)).await.unwrap();
    for n in 4..=5 {
        store.append(&group.id, &alice, &device, &format!("c{n}"), "{}", n).await.unwrap();
    }
    let page = |who: &UserId, from: PageFrom, limit: i64| {
        let (store, who) = (store.clone(), who.clone());
        async move {
            let (page, more) = store.history_page(&group.id, &who, from, limit).await.unwrap();
            (page.iter().map(|m| m.seq).collect::<Vec<_>>(), more)
        }
    };
    // Seq 4 is the system message that added carol.
    assert_eq!(page(&bob, PageFrom::Before(7), 2).await, (vec![5, 6], true));
    assert_eq!(page(&bob, PageFrom::Before(5), 2).await, (vec![3, 4], true));
    assert_eq!(page(&bob, PageFrom::Before(3), 2).await, (vec![1, 2], false));
    assert_eq!(page(&bob, PageFrom::After(4), 10).await, (vec![5, 6], false));
    assert_eq!(page(&bob, PageFrom::After(0), 3).await, (vec![1, 2, 3], true));
    // Carol reads back only to where she joined: the message that added her.
    assert_eq!(page(&carol, PageFrom::Before(7), 10).await, (vec![4, 5, 6], false));
    assert_eq!(page(&carol, PageFrom::Before(4), 10).await, (vec![], false));
    assert!(matches!(
        store.history_page(&group.id, &user("mallory"), PageFrom::Before(6), 10).await,
        Err(StoreError::NotMember)
    ));
}

async fn non_members_see_nothing(store: Store) {
    let (alice, bob, eve) = (user("alice"), user("bob"), user("eve"));
    let chat = store.direct(&alice, &bob).await.unwrap();
    let phone = store.add_device(&alice, "phone").await.unwrap().device;
    store.append(&chat.id, &alice, &phone, "c", "{}", 1).await.unwrap();
    let evil = store.add_device(&eve, "laptop").await.unwrap().device;
    assert!(matches!(store.messages_after(&chat.id, &eve, 0, 10).await, Err(StoreError::NotMember)));
    assert!(matches!(store.append(&chat.id, &eve, &evil, "x", "{}", 1).await, Err(StoreError::NotMember)));
    assert!(matches!(store.members(&chat.id, &eve).await, Err(StoreError::NotMember)));
    assert!(matches!(store.ack(&eve, &evil, &chat.id, 1).await, Err(StoreError::NotMember)));
    let nowhere = ConversationId::new();
    assert!(matches!(store.append(&nowhere, &alice, &phone, "x", "{}", 1).await, Err(StoreError::NotMember)));
    assert!(store.conversations(&eve).await.unwrap().is_empty());
    // Eve's failed send took no seq.
    assert_eq!(store.append(&chat.id, &alice, &phone, "d", "{}", 2).await.unwrap().message().seq, 2);
}

async fn groups_have_admins_and_a_size_limit(store: Store) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let group = store.create_group(&alice, "friends", &[bob.clone(), bob.clone()]).await.unwrap();
    assert_eq!(group.name.as_deref(), Some("friends"));
    let members = store.members(&group.id, &bob).await.unwrap();
    assert_eq!(members, vec![(alice.clone(), Role::Admin), (bob.clone(), Role::Member)]);

    assert!(matches!(
        store.add_members(&group.id, &bob, std::slice::from_ref(&carol)).await,
        Err(StoreError::NotAdmin)
    ));
    store.add_members(&group.id, &alice, std::slice::from_ref(&carol)).await.unwrap();
    assert_eq!(store.members(&group.id, &carol).await.unwrap().len(), 3);
    assert!(matches!(store.remove_member(&group.id, &bob, &carol).await, Err(StoreError::NotAdmin)));
    store.remove_member(&group.id, &carol, &carol).await.unwrap(); // leaving
    assert!(matches!(store.members(&group.id, &carol).await, Err(StoreError::NotMember)));
    store.remove_member(&group.id, &alice, &bob).await.unwrap();
    assert_eq!(store.members(&group.id, &alice).await.unwrap(), vec![(alice.clone(), Role::Admin)]);

    let crowd: Vec<UserId> = (0..MAX_GROUP_MEMBERS).map(|i| user(&format!("u{i}"))).collect();
    assert!(matches!(store.create_group(&alice, "too big", &crowd).await, Err(StoreError::TooManyMembers)));
    let full = store.create_group(&alice, "full", &crowd[..MAX_GROUP_MEMBERS - 1]).await.unwrap();
    assert_eq!(store.members(&full.id, &alice).await.unwrap().len(), MAX_GROUP_MEMBERS);
    assert!(matches!(
        store.add_members(&full.id, &alice, std::slice::from_ref(&carol)).await,
        Err(StoreError::TooManyMembers)
    ));

    let direct = store.direct(&alice, &bob).await.unwrap();
    assert!(matches!(
        store.add_members(&direct.id, &alice, std::slice::from_ref(&carol)).await,
        Err(StoreError::DirectConversation)
    ));
    for (actor, user) in [(&alice, &bob), (&alice, &alice)] {
        assert!(
            matches!(store.remove_member(&direct.id, actor, user).await, Err(StoreError::DirectConversation)),
            "nobody is removed from a direct conversation, nor leaves it"
        );
    }
    assert!(matches!(store.add_members(&direct.id, &carol, &[]).await, Err(StoreError::NotMember)));
}

async fn cursors_only_move_forward_and_count_unread(store: Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = store.direct(&alice, &bob).await.unwrap();
    let alices = store.add_device(&alice, "phone").await.unwrap().device;
    let bobs_phone = store.add_device(&bob, "phone").await.unwrap().device;
    let bobs_laptop = store.add_device(&bob, "laptop").await.unwrap().device;
    for n in 1..=5 {
        store.append(&chat.id, &alice, &alices, &format!("c{n}"), "{}", n).await.unwrap();
    }
    let unread =
        |s: &Vec<chat_core::ConversationSummary>| s.iter().find(|c| c.conversation.id == chat.id).unwrap().unread;
    assert_eq!(unread(&store.conversations(&bob).await.unwrap()), 5);
    assert_eq!(unread(&store.conversations(&alice).await.unwrap()), 0, "own messages are not unread");

    // Until bob answers, the conversation is a message request: his receipt moves but is not shared.
    let unanswered = store.ack(&bob, &bobs_phone, &chat.id, 1).await.unwrap();
    assert_eq!((unanswered.device.delivered, unanswered.receipt), (1, None));
    assert!(store.receipts(&alice).await.unwrap().is_empty(), "a message request shares no receipts");
    store.append(&chat.id, &bob, &bobs_phone, "b1", "{}", 6).await.unwrap();

    let acked = store.ack(&bob, &bobs_phone, &chat.id, 3).await.unwrap();
    assert_eq!(acked.device, Cursor { delivered: 3, read: 0 });
    assert_eq!(acked.receipt, Some(Cursor { delivered: 3, read: 0 }), "bob's receipt moved");
    let back = store.ack(&bob, &bobs_phone, &chat.id, 2).await.unwrap();
    assert_eq!((back.device.delivered, back.receipt), (3, None), "a cursor moved back");
    assert_eq!(
        store.ack(&bob, &bobs_phone, &chat.id, 99).await.unwrap().device.delivered,
        6,
        "a cursor passed the log"
    );
    let read = store.mark_read(&bob, &bobs_phone, &chat.id, 4).await.unwrap();
    assert_eq!(read.device, Cursor { delivered: 6, read: 4 });
    assert_eq!(read.receipt, Some(Cursor { delivered: 6, read: 4 }));
    // Another device behind the first moves its own cursor but not the user's receipt.
    let laptop = store.ack(&bob, &bobs_laptop, &chat.id, 2).await.unwrap();
    assert_eq!((laptop.device.delivered, laptop.receipt), (2, None));
    let receipts = store.receipts(&alice).await.unwrap();
    assert_eq!(receipts.len(), 1);
    assert_eq!((receipts[0].user.clone(), receipts[0].cursor), (bob.clone(), Cursor { delivered: 6, read: 4 }));
    assert!(store.receipts(&bob).await.unwrap().is_empty(), "alice has acked nothing");
    // Unread follows the user: what the phone read is read on the laptop too (whose cursor, for
    // replay, stays its own).
    assert_eq!(unread(&store.conversations(&bob).await.unwrap()), 1);
    let sync = store.sync_state(&bob, &bobs_laptop).await.unwrap();
    assert_eq!(sync, vec![SyncState { conversation: chat.id, last_seq: 6, delivered: 2, purged_upto: 0 }]);
    assert_eq!(store.sync_one(&bob, &bobs_phone, &chat.id).await.unwrap().delivered, 6);
    let listed = store.conversations(&bob).await.unwrap();
    assert_eq!(listed[0].conversation.last_seq, 6);
}

async fn removing_a_device_takes_its_cursors_and_tokens(store: Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = store.direct(&alice, &bob).await.unwrap();
    let phone = store.add_device(&bob, "phone").await.unwrap().device;
    store.append(&chat.id, &alice, &store.add_device(&alice, "a").await.unwrap().device, "c1", "{}", 1).await.unwrap();
    store.ack(&bob, &phone, &chat.id, 1).await.unwrap();
    store.issue_refresh("h1", &bob, &phone, i64::MAX, 1).await.unwrap();
    assert!(store.device_exists(&bob, &phone).await.unwrap());
    assert!(store.remove_device(&bob, &phone).await.unwrap());
    assert!(!store.device_exists(&bob, &phone).await.unwrap());
    assert!(!store.remove_device(&bob, &phone).await.unwrap(), "gone already");
    assert_eq!(store.rotate_refresh(&spend("h1", "h2", i64::MAX, 2)).await.unwrap(), Rotation::Invalid);
    assert_eq!(store.sync_one(&bob, &phone, &chat.id).await.unwrap().delivered, 0, "its cursor went with it");
}

async fn a_member_reads_from_when_they_joined(store: Store) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let group = store.create_group(&alice, "g", std::slice::from_ref(&bob)).await.unwrap();
    let device = store.add_device(&alice, "a").await.unwrap().device;
    let carols = store.add_device(&carol, "c").await.unwrap().device;
    store.append(&group.id, &alice, &device, "c1", "{}", 1).await.unwrap();
    store.add_members(&group.id, &alice, std::slice::from_ref(&carol)).await.unwrap();
    let seen: Vec<i64> = store.messages_after(&group.id, &carol, 0, 10).await.unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(seen, vec![2], "she reads from the message that added her");
    assert_eq!(store.sync_one(&carol, &carols, &group.id).await.unwrap().delivered, 1, "replay starts after joining");
    let listed = store.conversations(&carol).await.unwrap();
    assert_eq!(listed[0].unread, 0, "a system message is not unread");
    // The append answers with the members at its seq: carol now, not after she is removed.
    let written = store
        .write_batch(vec![Write::Append {
            conversation: group.id,
            sender: alice.clone(),
            device,
            client_id: "c2".into(),
            body: "{}".into(),
            now_ms: 2,
            push_delay_ms: None,
            effect: Effect::Ordinary,
        }])
        .await;
    let Ok(Written::Appended(_, members)) = &written[0] else { panic!("{written:?}") };
    assert_eq!(sorted(members.to_vec()), vec![alice.clone(), bob.clone(), carol.clone()]);
    store.remove_member(&group.id, &alice, &carol).await.unwrap();
    let written = store
        .write_batch(vec![Write::Append {
            conversation: group.id,
            sender: alice.clone(),
            device,
            client_id: "c3".into(),
            body: "{}".into(),
            now_ms: 3,
            push_delay_ms: None,
            effect: Effect::Ordinary,
        }])
        .await;
    let Ok(Written::Appended(_, members)) = &written[0] else { panic!("{written:?}") };
    assert!(!members.contains(&carol));
    // Out, she reads up to her removal (seq 4) and nothing after it.
    let seqs: Vec<i64> = store.messages_after(&group.id, &carol, 0, 10).await.unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    // Back again, she reads from her return only (seq 6, the message that added her).
    store.add_members(&group.id, &alice, std::slice::from_ref(&carol)).await.unwrap();
    store.append(&group.id, &alice, &device, "c4", "{}", 4).await.unwrap();
    let seqs: Vec<i64> = store.messages_after(&group.id, &carol, 0, 10).await.unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![6, 7]);
    assert_eq!(store.messages_after(&group.id, &bob, 0, 10).await.unwrap().len(), 7);
}

async fn fanout_follows_membership(store: Store) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let group = store.create_group(&alice, "g", &[bob.clone(), carol.clone()]).await.unwrap();
    let mut members = store.member_ids(&group.id).await.unwrap();
    members.sort();
    assert_eq!(members, vec![alice.clone(), bob.clone(), carol.clone()]);
    // The message of her removal goes to her as well, and is the last her devices replay.
    let written = store.write_batch(vec![Write::change(&group.id, &alice, Change::Remove(carol.clone()), 1)]).await;
    let Ok(Written::Appended(removal, to)) = &written[0] else { panic!("{written:?}") };
    assert!(to.contains(&carol), "{to:?}");
    assert!(!store.member_ids(&group.id).await.unwrap().contains(&carol));
    let seq = removal.message().seq;
    let carols = types::DeviceId::new();
    assert_eq!(store.sync_one(&carol, &carols, &group.id).await.unwrap().last_seq, seq);
    assert_eq!(store.sync_state(&carol, &carols).await.unwrap().len(), 1, "her removal is still to replay");
    // Her ack of it is taken, up to it and no further; then there is nothing left to replay.
    assert_eq!(store.ack(&carol, &carols, &group.id, seq + 5).await.unwrap().device.delivered, seq);
    assert!(store.sync_state(&carol, &carols).await.unwrap().is_empty());
    assert!(matches!(store.members(&group.id, &carol).await, Err(StoreError::NotMember)));
    let mallory = user("mallory");
    assert!(matches!(store.sync_one(&mallory, &carols, &group.id).await, Err(StoreError::NotMember)));
    assert!(matches!(store.ack(&mallory, &carols, &group.id, 1).await, Err(StoreError::NotMember)));
}

async fn group_changes_are_system_messages_in_the_log(store: Store) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let group = store.create_group(&alice, "g", std::slice::from_ref(&bob)).await.unwrap();
    let body = |m: &Message| serde_json::from_str::<serde_json::Value>(&m.body).unwrap();
    let change = |actor: &UserId, change: Change| {
        let (store, actor) = (store.clone(), actor.clone());
        async move { store.change(&group.id, &actor, change, 1).await }
    };

    let added = store.add_members(&group.id, &alice, &[carol.clone(), bob.clone()]).await.unwrap().unwrap();
    assert_eq!((added.seq, added.device, &added.sender), (1, DeviceId::SYSTEM, &alice));
    assert_eq!(body(&added), serde_json::json!({"system": "members_added", "by": "alice", "users": ["carol"]}));
    assert!(store.add_members(&group.id, &alice, std::slice::from_ref(&bob)).await.unwrap().is_none(), "no change");
    let history = store.messages_after(&group.id, &alice, 0, 10).await.unwrap();
    assert_eq!(history.len(), 1, "a change that changed nothing wrote nothing");

    // Settings: admins only, until the group lets every member; who may is the admins' to say.
    let rename = |name: &str| Change::Info(InfoChange { name: Some(name.into()), ..InfoChange::default() });
    assert!(matches!(change(&carol, rename("c")).await, Err(StoreError::NotAdmin)));
    let open = Change::Info(InfoChange { info_by_all: Some(true), ..InfoChange::default() });
    assert!(matches!(change(&carol, open.clone()).await, Err(StoreError::NotAdmin)));
    assert_eq!(change(&alice, open).await.unwrap().unwrap().seq, 2);
    let renamed = change(&carol, rename("trip")).await.unwrap().unwrap();
    assert_eq!(body(&renamed), serde_json::json!({"system": "group_updated", "by": "carol", "name": "trip"}));
    assert!(change(&carol, rename("trip")).await.unwrap().is_none());
    let described = Change::Info(InfoChange {
        description: Some(Some("june".into())),
        avatar: Some(Some("a-media".into())),
        ..InfoChange::default()
    });
    change(&bob, described).await.unwrap().unwrap();
    let details = store.details(&group.id, &bob).await.unwrap();
    assert_eq!(details.conversation.name.as_deref(), Some("trip"));
    assert_eq!(details.info.description.as_deref(), Some("june"));
    assert_eq!(details.info.avatar.as_deref(), Some("a-media"));
    assert!(details.info.info_by_all);

    // Admins: promoted and demoted by admins; the last one cannot step down, but may leave.
    let role = |user: &UserId, admin: bool| Change::Role { user: user.clone(), admin };
    assert!(matches!(change(&bob, role(&bob, true)).await, Err(StoreError::NotAdmin)));
    assert!(matches!(change(&alice, role(&alice, false)).await, Err(StoreError::LastAdmin)));
    let promoted = change(&alice, role(&bob, true)).await.unwrap().unwrap();
    assert_eq!(body(&promoted), serde_json::json!({"system": "admin_added", "by": "alice", "user": "bob"}));
    assert!(change(&alice, role(&bob, true)).await.unwrap().is_none());
    change(&bob, role(&alice, false)).await.unwrap().unwrap();
    assert!(matches!(change(&bob, role(&user("mallory"), true)).await, Err(StoreError::Invalid(_))));
    // Bob, the one admin, leaves: the longest-standing member left (alice, a founder) takes over.
    let left = store.remove_member(&group.id, &bob, &bob).await.unwrap().unwrap();
    assert_eq!(
        body(&left),
        serde_json::json!({"system": "member_left", "by": "bob", "user": "bob", "admins": ["alice"]})
    );
    let roles: Vec<(UserId, Role)> =
        store.details(&group.id, &carol).await.unwrap().members.into_iter().map(|m| (m.user, m.role)).collect();
    assert_eq!(roles, vec![(alice.clone(), Role::Admin), (carol.clone(), Role::Member)]);
    assert!(store.remove_member(&group.id, &alice, &bob).await.unwrap().is_none(), "not in: nothing to do");
    // Bob reads up to his leaving, and nothing said after it.
    store.append(&group.id, &alice, &DeviceId::new(), "after", "{}", 2).await.unwrap();
    let his = store.messages_after(&group.id, &bob, 0, 100).await.unwrap();
    assert_eq!(his.last().map(|m| m.seq), Some(left.seq));
    assert!(matches!(store.details(&group.id, &bob).await, Err(StoreError::NotMember)));
    assert!(matches!(change(&bob, rename("x")).await, Err(StoreError::NotMember)));

    let direct = store.direct(&alice, &carol).await.unwrap();
    assert!(matches!(store.change(&direct.id, &alice, rename("x"), 1).await, Err(StoreError::DirectConversation)));
    assert_eq!(store.details(&direct.id, &carol).await.unwrap().members.len(), 2);
}

async fn profiles_are_seen_as_their_owners_allow(store: Store) {
    let (alice, bob, carol, eve) = (user("alice"), user("bob"), user("carol"), user("eve"));
    for u in [&alice, &bob, &carol, &eve] {
        store.add_device(u, "d").await.unwrap();
    }
    let fresh = store.profile(&alice).await.unwrap();
    assert_eq!((fresh.name, fresh.visibility, fresh.updated_at), (None, Visibility::Contacts, 0));
    let edit = ProfileEdit {
        name: Some(Some("Alice".into())),
        about: Some(Some("climbing".into())),
        avatar: Some(Some("a-media".into())),
        visibility: None,
    };
    let own = store.set_profile(&alice, &edit).await.unwrap();
    assert_eq!((own.name.as_deref(), own.about.as_deref()), (Some("Alice"), Some("climbing")));
    assert!(own.updated_at > 0);
    // Fields left out stay as they were.
    let own = store.set_profile(&alice, &ProfileEdit { about: Some(None), ..ProfileEdit::default() }).await.unwrap();
    assert_eq!((own.name.as_deref(), own.about), (Some("Alice"), None));
    store
        .set_profile(&alice, &ProfileEdit { about: Some(Some("climbing".into())), ..ProfileEdit::default() })
        .await
        .unwrap();

    let seen = |viewer: &UserId| {
        let (store, viewer, alice) = (store.clone(), viewer.clone(), alice.clone());
        async move { store.profiles_for(&viewer, &[alice]).await.unwrap().pop() }
    };
    assert!(seen(&eve).await.is_none(), "a stranger sees nothing");
    // A direct chat earns nothing until alice writes in it.
    let chat = store.direct(&alice, &bob).await.unwrap();
    let bobs = store.add_device(&bob, "b").await.unwrap().device;
    store.append(&chat.id, &bob, &bobs, "b1", "{}", 1).await.unwrap();
    assert!(seen(&bob).await.is_none());
    let alices = store.add_device(&alice, "a2").await.unwrap().device;
    store.append(&chat.id, &alice, &alices, "a1", "{}", 2).await.unwrap();
    let by_bob = seen(&bob).await.unwrap();
    assert_eq!((by_bob.name.as_deref(), by_bob.about, by_bob.avatar), (Some("Alice"), None, None));
    // Contacts see the details; "everyone" shows them to all who see the name; "nobody" to none.
    store.add_contacts(&alice, std::slice::from_ref(&bob), false).await.unwrap();
    assert_eq!(seen(&bob).await.unwrap().about.as_deref(), Some("climbing"));
    // Being put in a group earns nobody a name; alice's writing there does.
    let group = store.create_group(&carol, "g", std::slice::from_ref(&alice)).await.unwrap();
    assert!(seen(&carol).await.is_none());
    store.append(&group.id, &alice, &alices, "a2", "{}", 3).await.unwrap();
    assert_eq!(seen(&carol).await.unwrap().about, None, "carol is not her contact");
    store
        .set_profile(&alice, &ProfileEdit { visibility: Some(Visibility::Everyone), ..ProfileEdit::default() })
        .await
        .unwrap();
    assert_eq!(seen(&carol).await.unwrap().avatar.as_deref(), Some("a-media"));
    store
        .set_profile(&alice, &ProfileEdit { visibility: Some(Visibility::Nobody), ..ProfileEdit::default() })
        .await
        .unwrap();
    assert_eq!(seen(&bob).await.unwrap().about, None);
    assert_eq!(seen(&alice).await.unwrap().about.as_deref(), Some("climbing"), "the owner sees it all");
    assert!(store.profiles_for(&carol, &[user("nobody")]).await.unwrap().is_empty());
    let mut watchers = store.profile_watchers(&alice).await.unwrap();
    watchers.sort();
    assert_eq!(watchers, vec![alice.clone(), bob.clone(), carol.clone()]);
}

async fn the_chat_list_pages_pinned_then_by_activity_with_flags_per_user(store: Store) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let bobs = store.add_device(&bob, "b").await.unwrap().device;
    let older = store.direct(&alice, &bob).await.unwrap();
    store.append(&older.id, &bob, &bobs, "b1", r#"{"text":"hi"}"#, 1_000).await.unwrap();
    let group = store.create_group(&alice, "g", &[bob.clone(), carol.clone()]).await.unwrap();
    store.append(&group.id, &bob, &bobs, "b2", r#"{"text":"newer"}"#, i64::MAX / 2).await.unwrap();
    let quiet = store.direct(&alice, &carol).await.unwrap();

    let ids = |page: &[chat_core::ConversationSummary]| page.iter().map(|c| c.conversation.id).collect::<Vec<_>>();
    let all = store.conversations(&alice).await.unwrap();
    assert_eq!(ids(&all), vec![group.id, quiet.id, older.id], "by last activity, newest first");
    let newest = &all[0];
    assert_eq!((newest.member_count, newest.unread), (3, 1));
    assert_eq!(
        (newest.last.sender.as_ref(), newest.last.body.as_deref(), newest.last.created_at),
        (Some(&bob), Some(r#"{"text":"newer"}"#), Some(i64::MAX / 2))
    );
    assert_eq!(all[1].last, chat_core::LastMessage::default(), "nothing said yet");
    // Pages go on from a cursor, with nothing twice and nothing left out.
    let first = store.conversation_page(&alice, None, 2).await.unwrap();
    let from = ListFrom::after(first.last().unwrap());
    let rest = store.conversation_page(&alice, Some(&from), 2).await.unwrap();
    assert_eq!([ids(&first), ids(&rest)].concat(), ids(&all));

    // Flags are the user's own; pinned come first.
    let set = FlagsEdit { pinned: Some(true), muted_until: Some(Some(i64::MAX)), archived: None };
    let flags = store.set_flags(&alice, &older.id, set).await.unwrap();
    assert_eq!(flags, Flags { muted_until: Some(i64::MAX), archived: false, pinned: true });
    let flags = store
        .set_flags(&alice, &older.id, FlagsEdit { muted_until: Some(None), ..FlagsEdit::default() })
        .await
        .unwrap();
    assert_eq!(flags, Flags { muted_until: None, archived: false, pinned: true });
    assert_eq!(ids(&store.conversations(&alice).await.unwrap()), vec![older.id, group.id, quiet.id]);
    let first = store.conversation_page(&alice, None, 1).await.unwrap();
    let rest = store.conversation_page(&alice, Some(&ListFrom::after(&first[0])), 5).await.unwrap();
    assert_eq!(ids(&rest), vec![group.id, quiet.id]);
    assert!(store.conversations(&bob).await.unwrap().iter().all(|c| !c.flags.pinned));
    assert!(matches!(store.set_flags(&carol, &older.id, FlagsEdit::default()).await, Err(StoreError::NotMember)));
    // A cursor survives its text form.
    assert_eq!(from.to_string().parse::<ListFrom>(), Ok(from.clone()));
    assert!("1.x.y".parse::<ListFrom>().is_err());
}

fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

async fn presence_goes_to_contacts_and_to_answered_direct_chats(store: Store) {
    let (alice, bob, carol, dave) = (user("alice"), user("bob"), user("carol"), user("dave"));
    let device = types::DeviceId::new();
    // A stranger who writes first earns nothing until the other answers.
    let direct = store.direct(&bob, &alice).await.unwrap();
    store.append(&direct.id, &bob, &device, "b1", "{}", 1).await.unwrap();
    assert!(store.audience(&alice).await.unwrap().is_empty());
    assert!(store.audience(&bob).await.unwrap().is_empty());
    assert!(store.watched(&bob).await.unwrap().is_empty());
    store.append(&direct.id, &alice, &device, "a1", "{}", 2).await.unwrap();
    assert_eq!(store.audience(&alice).await.unwrap(), vec![bob.clone()]);
    assert_eq!(store.audience(&bob).await.unwrap(), vec![alice.clone()]);
    // Talking in a group is not talking to each other.
    let group = store.create_group(&alice, "g", std::slice::from_ref(&carol)).await.unwrap();
    store.append(&group.id, &alice, &device, "g1", "{}", 3).await.unwrap();
    store.append(&group.id, &carol, &device, "g2", "{}", 4).await.unwrap();
    assert_eq!(store.audience(&alice).await.unwrap(), vec![bob.clone()]);

    // A contact sees the user who added them, not the other way round.
    store.add_device(&dave, "phone").await.unwrap();
    let err = store.add_contacts(&alice, &[dave.clone(), user("nobody")], false).await.unwrap_err();
    assert!(matches!(err, StoreError::UnknownUsers(ref u) if *u == vec![user("nobody")]), "{err:?}");
    assert!(store.contact_list(&alice).await.unwrap().is_empty(), "a refused list adds nobody");
    store.add_contacts(&alice, &[dave.clone(), alice.clone(), dave.clone()], false).await.unwrap();
    let listed: Vec<UserId> = store.contact_list(&alice).await.unwrap().into_iter().map(|c| c.user).collect();
    assert_eq!(listed, vec![dave.clone()], "once each, never oneself");
    assert_eq!(sorted(store.audience(&alice).await.unwrap()), vec![bob.clone(), dave.clone()]);
    assert!(store.audience(&dave).await.unwrap().is_empty());
    store.set_last_seen(&alice, 1234).await.unwrap();
    let seen = store.watched(&dave).await.unwrap();
    assert_eq!((seen.len(), &seen[0].user, seen[0].last_seen), (1, &alice, 1234));
    assert!(store.watched(&alice).await.unwrap().iter().all(|c| c.user != dave));

    // Last seen can be kept to oneself.
    assert!(store.privacy(&alice).await.unwrap().share_last_seen);
    store.set_privacy(&alice, chat_core::Privacy { share_last_seen: false }).await.unwrap();
    assert!(!store.privacy(&alice).await.unwrap().share_last_seen);
    assert_eq!(store.watched(&dave).await.unwrap()[0].last_seen, 0);

    // Replacing the list and removing a contact take effect at once.
    store.add_contacts(&alice, std::slice::from_ref(&carol), true).await.unwrap();
    assert_eq!(sorted(store.audience(&alice).await.unwrap()), vec![bob.clone(), carol.clone()]);
    assert!(store.remove_contact(&alice, &carol).await.unwrap());
    assert!(!store.remove_contact(&alice, &carol).await.unwrap());
    assert_eq!(store.audience(&alice).await.unwrap(), vec![bob.clone()]);
}

async fn a_link_request_is_answered_once_by_another_device_and_collected_once(store: Store) {
    use chat_core::{LinkAnswer, LinkState};
    let alice = user("alice");
    let asker = store.add_device(&alice, "laptop").await.unwrap().device;
    let phone = store.add_device(&alice, "phone").await.unwrap().device;
    store.create_link_request("r1", &alice, &asker, "tablet", 1_000).await.unwrap();
    assert_eq!(store.collect_link("r1", &alice, &asker, 10).await.unwrap(), LinkState::Pending);
    // The asking device cannot approve itself; another user's device finds nothing.
    assert_eq!(store.answer_link_request("r1", &alice, &asker, true, 10).await.unwrap(), LinkAnswer::OwnRequest);
    let mallory = user("mallory");
    let theirs = store.add_device(&mallory, "x").await.unwrap().device;
    assert_eq!(store.answer_link_request("r1", &mallory, &theirs, true, 10).await.unwrap(), LinkAnswer::Unknown);
    // Two approvals at once: one links a device, the other finds nothing pending.
    let answers = join_all((0..4).map(|_| store.answer_link_request("r1", &alice, &phone, true, 10))).await;
    let linked: Vec<_> = answers
        .iter()
        .filter_map(|a| match a.as_ref().unwrap() {
            LinkAnswer::Answered { name, requested_by, linked: Some(linked) } => {
                assert_eq!((name.as_str(), requested_by), ("tablet", &asker));
                Some(linked.device)
            }
            LinkAnswer::Unknown => None,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(linked.len(), 1, "{answers:?}");
    assert_eq!(store.devices(&alice).await.unwrap().len(), 3);
    // Collected once, by the device that asked.
    assert_eq!(store.collect_link("r1", &alice, &phone, 20).await.unwrap(), LinkState::Unknown);
    assert_eq!(store.collect_link("r1", &alice, &asker, 20).await.unwrap(), LinkState::Linked(linked[0]));
    assert_eq!(store.collect_link("r1", &alice, &asker, 20).await.unwrap(), LinkState::Unknown);

    // Denied, and expired.
    store.create_link_request("r2", &alice, &asker, "watch", 1_000).await.unwrap();
    let denied = store.answer_link_request("r2", &alice, &phone, false, 10).await.unwrap();
    assert!(matches!(denied, LinkAnswer::Answered { linked: None, .. }), "{denied:?}");
    assert_eq!(store.collect_link("r2", &alice, &asker, 20).await.unwrap(), LinkState::Denied);
    store.create_link_request("r3", &alice, &asker, "car", 1_000).await.unwrap();
    assert_eq!(store.answer_link_request("r3", &alice, &phone, true, 1_000).await.unwrap(), LinkAnswer::Unknown);
    assert_eq!(store.collect_link("r3", &alice, &asker, 1_000).await.unwrap(), LinkState::Unknown);
    assert_eq!(store.sweep_link_requests(2_000).await.unwrap(), 2, "r2 and r3 expired; r1 has longer to be collected");
    // The asking device going takes its requests with it.
    store.create_link_request("r4", &alice, &asker, "fridge", 5_000).await.unwrap();
    assert!(store.remove_device(&alice, &asker).await.unwrap());
    assert_eq!(store.answer_link_request("r4", &alice, &phone, true, 10).await.unwrap(), LinkAnswer::Unknown);
}

async fn phones_are_discovered_in_one_call(store: Store) {
    let a = store.user_for_phone("+4915100000001", 1).await.unwrap();
    let b = store.user_for_phone("+4915100000002", 1).await.unwrap();
    let phones: Vec<String> = ["+4915100000002", "+4915100000009", "+4915100000001"].map(String::from).to_vec();
    let mut found = store.lookup_phones(&phones).await.unwrap();
    found.sort();
    assert_eq!(found, vec![("+4915100000001".to_owned(), a), ("+4915100000002".to_owned(), b)]);
    assert!(store.lookup_phones(&[]).await.unwrap().is_empty());
}

async fn rate_limits_let_a_burst_through_then_one_per_interval(store: Store) {
    let take = |key: &'static str, now: i64| {
        let store = store.clone();
        async move { store.take_token("test", key, 1000, 3, now).await.unwrap() }
    };
    for _ in 0..3 {
        assert_eq!(take("a", 10_000).await, None);
    }
    let wait = take("a", 10_000).await.expect("the fourth at once is refused");
    assert_eq!(wait, 1000, "the next token comes an interval after the burst");
    assert_eq!(take("b", 10_000).await, None, "each key has its own bucket");
    assert_eq!(take("a", 10_500).await, Some(500));
    assert_eq!(take("a", 11_000).await, None);
    assert!(take("a", 11_000).await.is_some());
    // Concurrent takes never let more through than the bucket holds.
    let taken = join_all((0..20).map(|_| take("c", 50_000))).await;
    assert_eq!(taken.iter().filter(|t| t.is_none()).count(), 3);
    // Buckets that are full again are forgotten; the others are kept.
    assert_eq!(store.sweep_limits(12_500).await.unwrap(), 1, "b is full again by then");
    assert!(take("a", 12_500).await.is_none());
}

async fn push_intents_go_with_messages_to_the_devices_that_did_not_ack(store: Store) {
    let (alice, bob, carol, dave) = (user("alice"), user("bob"), user("carol"), user("dave"));
    let alices = store.add_device(&alice, "a").await.unwrap().device;
    let bob1 = store.add_device(&bob, "b1").await.unwrap().device;
    let bob2 = store.add_device(&bob, "b2").await.unwrap().device;
    let carols = store.add_device(&carol, "c").await.unwrap().device;
    let group = store.create_group(&alice, "g", &[bob.clone(), carol.clone()]).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let append = |client_id: &str, at: i64, push_delay_ms: Option<i64>| Write::Append {
        conversation: group.id,
        sender: alice.clone(),
        device: alices,
        client_id: client_id.into(),
        body: "{}".into(),
        now_ms: at,
        push_delay_ms,
        effect: Effect::Ordinary,
    };
    // Without a notifier no intent is written.
    store.write_batch(vec![append("c0", now, None)]).await;
    assert!(store.claim_pushes(now + 10_000, 60_000, 10).await.unwrap().is_empty());
    let written = store.write_batch(vec![append("c1", now, Some(5_000)), append("c2", now + 1, Some(5_000))]).await;
    assert!(written.iter().all(Result::is_ok), "{written:?}");
    // A retried send writes no second intent.
    let retried = store.write_batch(vec![append("c1", now + 2, Some(5_000))]).await;
    assert!(matches!(&retried[0], Ok(Written::Appended(Appended::Duplicate(_), _))), "{retried:?}");
    assert_eq!(store.next_push_due().await.unwrap(), Some(now + 5_000));
    assert!(store.claim_pushes(now + 4_999, 60_000, 10).await.unwrap().is_empty(), "nothing is due before the delay");
    // Dave joins after the messages, with a device linked after them: neither is pushed.
    store.add_members(&group.id, &alice, std::slice::from_ref(&dave)).await.unwrap();
    store.add_device(&dave, "d").await.unwrap();
    // Bob's first device acks within the delay; Carol's acks the older message only.
    store.ack(&bob, &bob1, &group.id, 3).await.unwrap();
    store.ack(&carol, &carols, &group.id, 2).await.unwrap();

    let claimed = store.claim_pushes(now + 5_001, 60_000, 10).await.unwrap();
    assert_eq!(sorted(claimed.iter().map(|i| i.seq).collect()), vec![2, 3]);
    assert!(claimed.iter().all(|i| i.attempts == 1 && i.sender == alice && i.conversation == group.id));
    assert!(store.claim_pushes(now + 5_001, 60_000, 10).await.unwrap().is_empty(), "a claim holds them");
    let newest = claimed.iter().find(|i| i.seq == 3).unwrap();
    let targets: Vec<(UserId, DeviceId)> =
        store.push_targets(newest).await.unwrap().into_iter().map(|t| (t.user, t.device)).collect();
    assert_eq!(sorted(targets), sorted(vec![(bob.clone(), bob2), (carol.clone(), carols)]));

    // A failed push is due again at its retry, not before.
    store.retry_pushes(&claimed, now + 20_000).await.unwrap();
    assert!(store.claim_pushes(now + 19_999, 60_000, 10).await.unwrap().is_empty());
    let again = store.claim_pushes(now + 20_000, 60_000, 10).await.unwrap();
    assert!(again.len() == 2 && again.iter().all(|i| i.attempts == 2), "{again:?}");
    // A claim whose node died falls due again when its lease runs out.
    let after_lease = store.claim_pushes(now + 80_000, 60_000, 10).await.unwrap();
    assert!(after_lease.len() == 2 && after_lease.iter().all(|i| i.attempts == 3), "{after_lease:?}");
    // Finishing a claim that lapsed (another node holds the intents now) changes nothing.
    store.pushes_done(&again).await.unwrap();
    store.retry_pushes(&again, now + 1).await.unwrap();
    assert_eq!(store.next_push_due().await.unwrap(), Some(after_lease[0].lease));
    store.pushes_done(&after_lease).await.unwrap();
    assert_eq!(store.next_push_due().await.unwrap(), None);
    // A message deleted before its push fell due is not pushed.
    let Write::Append { conversation, sender, device, client_id, now_ms, push_delay_ms, effect, .. } =
        append("gone", now, Some(5_000))
    else {
        unreachable!()
    };
    let readable = Write::Append {
        conversation,
        sender,
        device,
        client_id,
        body: r#"{"text":"oops"}"#.into(),
        now_ms,
        push_delay_ms,
        effect,
    };
    let written = store.write_batch(vec![readable]).await;
    let Ok(Written::Appended(Appended::New(gone), _)) = &written[0] else { panic!("{written:?}") };
    let delete = Write::Append {
        conversation: group.id,
        sender: alice.clone(),
        device: alices,
        client_id: "delete gone".into(),
        body: "{}".into(),
        now_ms: now + 1,
        push_delay_ms: None,
        effect: Effect::Delete { to: gone.seq },
    };
    assert!(store.write_batch(vec![delete]).await[0].is_ok());
    assert_eq!(store.next_push_due().await.unwrap(), None);

    // Concurrent claims (several nodes) never take one intent twice.
    let sends: Vec<Write> = (0..40).map(|n| append(&format!("m{n}"), now, Some(0))).collect();
    store.write_batch(sends).await;
    let claims = join_all((0..4).map(|_| store.claim_pushes(now + 1_000, 60_000, 15))).await;
    let mut seqs: Vec<i64> = claims.into_iter().flat_map(|c| c.unwrap()).map(|i| i.seq).collect();
    seqs.extend(store.claim_pushes(now + 1_000, 60_000, 100).await.unwrap().iter().map(|i| i.seq));
    // Seqs 1-3 are messages, 4 the system message that added dave, 5 and 6 the deleted one and
    // its deletion.
    assert_eq!(sorted(seqs), (7..47).collect::<Vec<i64>>(), "every intent claimed exactly once");
}

async fn reactions_edits_deletions_and_timers_are_checked_where_they_are_stored(store: Store) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let alices = store.add_device(&alice, "a").await.unwrap().device;
    let bobs = store.add_device(&bob, "b").await.unwrap().device;
    let carols = store.add_device(&carol, "c").await.unwrap().device;
    let group = store.create_group(&alice, "g", std::slice::from_ref(&bob)).await.unwrap();
    let send = |sender: &UserId, device: DeviceId, client_id: &str, body: &str, now_ms: i64, effect: Effect| {
        let write = Write::Append {
            conversation: group.id,
            sender: sender.clone(),
            device,
            client_id: client_id.into(),
            body: body.into(),
            now_ms,
            push_delay_ms: None,
            effect,
        };
        let store = store.clone();
        async move {
            match store.write_batch(vec![write]).await.pop().unwrap() {
                Ok(Written::Appended(appended, _)) => Ok(appended.message().clone()),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e),
            }
        }
    };
    let body_at = |seq: i64| {
        let store = store.clone();
        let (group, bob) = (group.id, bob.clone());
        async move { store.messages_after(&group, &bob, seq - 1, 1).await.unwrap().remove(0).body }
    };
    let t = 1_000_000;
    assert_eq!(send(&alice, alices, "a1", r#"{"text":"hi"}"#, t, Effect::Ordinary).await.unwrap().seq, 1);
    let edit = |text: &str| Effect::Edit { to: 1, text: text.into() };
    assert!(matches!(send(&bob, bobs, "b1", "{}", t + 1, edit("x")).await, Err(StoreError::NotSender)));
    assert_eq!(send(&alice, alices, "a2", "{}", t + 2, edit("hello")).await.unwrap().seq, 2, "refusals take no seq");
    let edited: serde_json::Value = serde_json::from_str(&body_at(1).await).unwrap();
    assert_eq!(edited, serde_json::json!({"text": "hello", "edited_at": t + 2}));
    let late = t + EDIT_WINDOW_MS + 1;
    assert!(matches!(send(&alice, alices, "a3", "{}", late, edit("again")).await, Err(StoreError::TooLate)));
    assert!(
        matches!(send(&alice, alices, "a4", "{}", late, Effect::React { to: 2 }).await, Err(StoreError::NotEditable)),
        "an edit is not a message to react to"
    );
    assert_eq!(send(&bob, bobs, "b2", "{}", late, Effect::React { to: 1 }).await.unwrap().seq, 3);
    // Carol, added now (seq 4), cannot act on what was said before she joined.
    store.change(&group.id, &alice, Change::Add(vec![carol.clone()]), late).await.unwrap();
    assert!(matches!(
        send(&carol, carols, "c1", "{}", late, Effect::React { to: 1 }).await,
        Err(StoreError::UnknownMessage)
    ));
    assert!(matches!(
        send(&alice, alices, "a5", "{}", late, Effect::Delete { to: 9 }).await,
        Err(StoreError::UnknownMessage)
    ));
    assert!(matches!(send(&bob, bobs, "b3", "{}", late, Effect::Delete { to: 1 }).await, Err(StoreError::NotSender)));
    assert_eq!(send(&alice, alices, "a6", "{}", late, Effect::Delete { to: 1 }).await.unwrap().seq, 5);
    assert_eq!(body_at(1).await, DELETED_BODY);
    let too_old = late + DELETE_WINDOW_MS + 1;
    assert_eq!(send(&bob, bobs, "b4", r#"{"text":"x"}"#, late, Effect::Ordinary).await.unwrap().seq, 6);
    assert!(matches!(send(&bob, bobs, "b5", "{}", too_old, Effect::Delete { to: 6 }).await, Err(StoreError::TooLate)));

    // The timer: admins only in a group; messages to read sent under it carry when they go.
    let timer = Effect::Timer { secs: 60 };
    assert!(matches!(send(&bob, bobs, "b6", "{}", too_old, timer.clone()).await, Err(StoreError::NotAdmin)));
    assert_eq!(send(&alice, alices, "a7", "{}", too_old, timer).await.unwrap().expires_at, None);
    let fading = send(&bob, bobs, "b7", r#"{"text":"fading"}"#, too_old, Effect::Ordinary).await.unwrap();
    assert_eq!((fading.seq, fading.expires_at), (8, Some(too_old + 60_000)));
    let reaction = send(&alice, alices, "a8", "{}", too_old, Effect::React { to: 8 }).await.unwrap();
    assert_eq!(reaction.expires_at, None, "a reaction goes with its message");
    assert!(store.due_expiries(too_old + 59_999, 10).await.unwrap().is_empty());
    let due = store.due_expiries(too_old + 60_000, 10).await.unwrap();
    assert_eq!(due, vec![(group.id, 8, r#"{"text":"fading"}"#.to_owned())]);
    store.expire(&due).await.unwrap();
    assert!(store.due_revocations(10).await.unwrap().is_empty(), "no media, nothing to take back");
    assert_eq!(body_at(8).await, EXPIRED_BODY);
    assert!(store.due_expiries(i64::MAX, 10).await.unwrap().is_empty());

    // An edit goes when the message it edits does: with its timer, or with its deletion.
    let t2 = too_old + 100_000;
    let short = send(&bob, bobs, "b8", r#"{"text":"short"}"#, t2, Effect::Ordinary).await.unwrap();
    let edit = Effect::Edit { to: short.seq, text: "shorter".into() };
    let edited = send(&bob, bobs, "b9", r#"{"edit":9,"text":"shorter"}"#, t2 + 1, edit.clone()).await.unwrap();
    assert_eq!(edited.expires_at, short.expires_at, "an edit disappears with its message");
    let due = store.due_expiries(t2 + 60_000, 10).await.unwrap();
    assert_eq!(due.iter().map(|d| d.1).collect::<Vec<_>>(), vec![short.seq, edited.seq]);
    assert!(
        matches!(send(&bob, bobs, "b10", "{}", t2 + 60_000, edit).await, Err(StoreError::NotEditable)),
        "a message whose time is up is not edited"
    );
    store.expire(&due).await.unwrap();
    assert_eq!(body_at(edited.seq).await, EXPIRED_BODY, "the edit's text went too");

    store
        .write_batch(vec![Write::Append {
            conversation: group.id,
            sender: alice.clone(),
            device: alices,
            client_id: "a9".into(),
            body: "{}".into(),
            now_ms: t2 + 60_001,
            push_delay_ms: None,
            effect: Effect::Timer { secs: 0 },
        }])
        .await;
    let media = types::MediaId::new().to_string();
    let photo =
        send(&bob, bobs, "b11", &format!(r#"{{"media":"{media}"}}"#), t2 + 60_002, Effect::Ordinary).await.unwrap();
    let text = send(&bob, bobs, "b12", r#"{"text":"typo"}"#, t2 + 60_003, Effect::Ordinary).await.unwrap();
    let fix = Effect::Edit { to: text.seq, text: "fixed".into() };
    let fixed = send(&bob, bobs, "b13", r#"{"edit":13,"text":"fixed"}"#, t2 + 60_004, fix).await.unwrap();
    assert!(store.due_revocations(10).await.unwrap().is_empty());
    send(&bob, bobs, "b14", "{}", t2 + 60_005, Effect::Delete { to: photo.seq }).await.unwrap();
    send(&bob, bobs, "b15", "{}", t2 + 60_006, Effect::Delete { to: text.seq }).await.unwrap();
    assert_eq!(body_at(fixed.seq).await, DELETED_BODY, "a deleted message's edits lose their text");
    assert_eq!(
        store.due_revocations(10).await.unwrap(),
        vec![(group.id, photo.seq, media)],
        "queued with the deletion"
    );
    store.revoked(&[(group.id, photo.seq)]).await.unwrap();
    assert!(store.due_revocations(10).await.unwrap().is_empty());

    // A disappearing media message queues its revocation with its tombstone.
    let t3 = t2 + 70_000;
    send(&alice, alices, "a10", "{}", t3, Effect::Timer { secs: 1 }).await.unwrap();
    let fleeting = types::MediaId::new().to_string();
    let body = format!(r#"{{"media":"{fleeting}"}}"#);
    let flash = send(&bob, bobs, "b16", &body, t3, Effect::Ordinary).await.unwrap();
    let due = store.due_expiries(t3 + 1_000, 10).await.unwrap();
    store.expire(&due).await.unwrap();
    assert_eq!(store.due_revocations(10).await.unwrap(), vec![(group.id, flash.seq, fleeting)]);

    let seqs: Vec<i64> = store.messages_after(&group.id, &alice, 0, 30).await.unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=19).collect::<Vec<_>>(), "the log stays gapless");
}

async fn retention_purges_old_messages_and_says_how_far(store: Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = store.direct(&alice, &bob).await.unwrap();
    let other = store.direct(&alice, &user("carol")).await.unwrap();
    let device = store.add_device(&alice, "a").await.unwrap().device;
    let media = types::MediaId::new().to_string();
    // Seq 2 shares a media; seq 3 only says the word (a text with "media" in it and a NUL, which
    // PostgreSQL's jsonb would refuse).
    let bodies = [
        "{}".to_owned(),
        format!(r#"{{"media":"{media}","caption":"x"}}"#),
        r#"{"text":"\"media\" \u0000"}"#.to_owned(),
        "{}".to_owned(),
        "{}".to_owned(),
    ];
    for ((n, at), body) in [(1, 10), (2, 20), (3, 30), (4, 5_000), (5, 6_000)].into_iter().zip(&bodies) {
        store.append(&chat.id, &alice, &device, &format!("c{n}"), body, at).await.unwrap();
    }
    store.append(&other.id, &alice, &device, "x", "{}", 7_000).await.unwrap();
    assert_eq!(store.purge_before(1_000).await.unwrap(), 3);
    // The purged media message's grants are to be taken back, as a deletion's are.
    assert_eq!(store.due_revocations(10).await.unwrap(), vec![(chat.id, 2, media)]);
    let kept: Vec<i64> = store.messages_after(&chat.id, &bob, 0, 10).await.unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(kept, vec![4, 5]);
    let bobs = store.add_device(&bob, "b").await.unwrap().device;
    assert_eq!(store.sync_one(&bob, &bobs, &chat.id).await.unwrap().purged_upto, 3);
    assert_eq!(store.sync_one(&alice, &device, &other.id).await.unwrap().purged_upto, 0, "untouched");
    assert_eq!(store.purge_before(1_000).await.unwrap(), 0);
    let next = store.append(&chat.id, &alice, &device, "c6", "{}", 8_000).await.unwrap();
    assert_eq!(next.message().seq, 6, "seqs go on after a purge");
}

async fn retention_cuts_a_prefix_of_the_log_in_slices(store: Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = store.direct(&alice, &bob).await.unwrap();
    let device = store.add_device(&alice, "a").await.unwrap().device;
    // Seq 2's clock ran behind seq 1's (times are taken before the write queue, and nodes' clocks
    // differ): it takes seq 1's time, so times never go backwards and a purge cuts a prefix.
    store.append(&chat.id, &alice, &device, "c1", "{}", 160).await.unwrap();
    let behind = store.append(&chat.id, &alice, &device, "c2", "{}", 140).await.unwrap();
    assert_eq!(behind.message().created_at, 160);
    store.append(&chat.id, &alice, &device, "c3", "{}", 5_000).await.unwrap();
    assert_eq!(store.purge_before(150).await.unwrap(), 0, "seq 2 is not older than seq 1");
    assert_eq!(store.purge_before(170).await.unwrap(), 2);
    let kept: Vec<i64> = store.messages_after(&chat.id, &bob, 0, 10).await.unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(kept, vec![3]);
    assert_eq!(store.sync_one(&alice, &device, &chat.id).await.unwrap().purged_upto, 2);

    // More than a slice of old messages go in several short transactions, all of them.
    let many = chat_core::PURGE_SLICE * 2 + 17;
    let batch: Vec<Write> = (0..many)
        .map(|n| Write::Append {
            conversation: chat.id,
            sender: alice.clone(),
            device,
            client_id: format!("old-{n}"),
            body: "{}".into(),
            now_ms: 6_000,
            push_delay_ms: None,
            effect: Effect::Ordinary,
        })
        .collect();
    assert!(store.write_batch(batch).await.iter().all(Result::is_ok));
    store.append(&chat.id, &alice, &device, "new", "{}", 9_000).await.unwrap();
    assert_eq!(store.purge_before(8_000).await.unwrap(), many as u64 + 1);
    let kept = store.messages_after(&chat.id, &bob, 0, 10).await.unwrap();
    assert_eq!(kept.iter().map(|m| m.client_id.as_str()).collect::<Vec<_>>(), vec!["new"]);
    assert_eq!(store.sync_one(&alice, &device, &chat.id).await.unwrap().purged_upto, kept[0].seq - 1);
}

async fn phone_codes_expire_and_lock(store: Store) {
    let phone = "+4915112345678";
    assert_eq!(store.check_code(phone, "h", 0).await.unwrap(), CodeCheck::Missing);
    store.put_code(phone, "right", 1_000, 0).await.unwrap();
    assert_eq!(store.check_code(phone, "wrong", 10).await.unwrap(), CodeCheck::Wrong);
    assert_eq!(store.check_code(phone, "right", 1_000).await.unwrap(), CodeCheck::Expired);
    assert_eq!(store.check_code(phone, "right", 20).await.unwrap(), CodeCheck::Valid);
    assert_eq!(store.check_code(phone, "right", 20).await.unwrap(), CodeCheck::Missing, "a code is used once");

    store.put_code(phone, "right", 1_000, 0).await.unwrap();
    for _ in 0..MAX_CODE_ATTEMPTS {
        assert_eq!(store.check_code(phone, "wrong", 10).await.unwrap(), CodeCheck::Wrong);
    }
    assert_eq!(store.check_code(phone, "right", 10).await.unwrap(), CodeCheck::Locked, "guessing is bounded");
    store.put_code(phone, "new", 1_000, 0).await.unwrap();
    assert_eq!(store.check_code(phone, "new", 10).await.unwrap(), CodeCheck::Valid, "a new code starts over");

    assert_eq!(store.lookup_phone(phone).await.unwrap(), None);
    let first = store.user_for_phone(phone, 1).await.unwrap();
    assert_eq!(store.user_for_phone(phone, 2).await.unwrap(), first, "one user per phone");
    assert_eq!(store.lookup_phone(phone).await.unwrap(), Some(first.clone()));
    assert_ne!(store.user_for_phone("+4915100000000", 3).await.unwrap(), first);
}

/// A refresh from one client address with no grace for retries.
fn spend<'a>(old_hash: &'a str, new_hash: &'a str, expires_at_ms: i64, now_ms: i64) -> Spend<'a> {
    Spend { old_hash, new_hash, client: "192.0.2.1", grace_ms: 0, expires_at_ms, now_ms }
}

async fn a_refresh_retried_within_the_grace_is_taken_again(store: Store) {
    let bob = user("bob");
    let phone = store.add_device(&bob, "phone").await.unwrap().device;
    store.issue_refresh("t1", &bob, &phone, 100_000, 0).await.unwrap();
    let from = |client, old, new, now| Spend {
        old_hash: old,
        new_hash: new,
        client,
        grace_ms: 1_000,
        expires_at_ms: 100_000,
        now_ms: now,
    };
    let rotated = Rotation::Rotated { user: bob.clone(), device: phone };
    assert_eq!(store.rotate_refresh(&from("a", "t1", "t2", 10)).await.unwrap(), rotated);
    // The answer carrying t2 was lost: the same client sends t1 again and gets t3; t2 is spent.
    assert_eq!(store.rotate_refresh(&from("a", "t1", "t3", 500)).await.unwrap(), rotated);
    assert_eq!(store.rotate_refresh(&from("a", "t3", "t4", 700)).await.unwrap(), rotated);
    // Another client (the phone moved networks) spends t4, and retries it within the grace.
    assert_eq!(store.rotate_refresh(&from("b", "t4", "t5", 800)).await.unwrap(), rotated);
    assert_eq!(store.rotate_refresh(&from("b", "t4", "t6", 900)).await.unwrap(), rotated, "t5 was never used");
    // t3 again, within the grace and from the client that spent it, but its successor was used:
    // a copy. The device is logged out.
    assert_eq!(
        store.rotate_refresh(&from("a", "t3", "t7", 950)).await.unwrap(),
        Rotation::Reused { user: bob.clone(), device: phone }
    );
    assert!(!store.device_exists(&bob, &phone).await.unwrap());

    // The successor a retry took back, presented later (a thief who raced the device): a copy.
    let tablet = store.add_device(&bob, "tablet").await.unwrap().device;
    store.issue_refresh("s1", &bob, &tablet, 100_000, 0).await.unwrap();
    assert!(matches!(store.rotate_refresh(&from("a", "s1", "s2", 10)).await.unwrap(), Rotation::Rotated { .. }));
    assert!(matches!(store.rotate_refresh(&from("a", "s1", "s3", 20)).await.unwrap(), Rotation::Rotated { .. }));
    assert_eq!(
        store.rotate_refresh(&from("a", "s2", "s4", 30)).await.unwrap(),
        Rotation::Reused { user: bob.clone(), device: tablet }
    );

    // Past the grace, a retry from the same client is a copy too.
    let laptop = store.add_device(&bob, "laptop").await.unwrap().device;
    store.issue_refresh("l1", &bob, &laptop, 100_000, 0).await.unwrap();
    assert!(matches!(store.rotate_refresh(&from("a", "l1", "l2", 10)).await.unwrap(), Rotation::Rotated { .. }));
    assert_eq!(
        store.rotate_refresh(&from("a", "l1", "l3", 1_011)).await.unwrap(),
        Rotation::Reused { user: bob.clone(), device: laptop }
    );
}

async fn a_reused_refresh_token_logs_the_device_out(store: Store) {
    let bob = user("bob");
    let phone = store.add_device(&bob, "phone").await.unwrap().device;
    let laptop = store.add_device(&bob, "laptop").await.unwrap().device;
    store.issue_refresh("p1", &bob, &phone, 1_000, 0).await.unwrap();
    store.issue_refresh("l1", &bob, &laptop, 1_000, 0).await.unwrap();
    let rotated = store.rotate_refresh(&spend("p1", "p2", 2_000, 10)).await.unwrap();
    assert_eq!(rotated, Rotation::Rotated { user: bob.clone(), device: phone });
    assert_eq!(store.rotate_refresh(&spend("p2", "p3", 3_000, 2_000)).await.unwrap(), Rotation::Invalid, "expired");
    assert_eq!(store.rotate_refresh(&spend("nope", "x", 3_000, 20)).await.unwrap(), Rotation::Invalid);

    // p1 again: a copy of a spent token. The phone is logged out, the laptop is not.
    assert_eq!(
        store.rotate_refresh(&spend("p1", "p9", 3_000, 30)).await.unwrap(),
        Rotation::Reused { user: bob.clone(), device: phone }
    );
    assert!(!store.device_exists(&bob, &phone).await.unwrap());
    assert!(store.device_exists(&bob, &laptop).await.unwrap());
    assert!(matches!(store.rotate_refresh(&spend("l1", "l2", 3_000, 40)).await.unwrap(), Rotation::Rotated { .. }));
}

async fn a_batch_commits_what_succeeds_and_refuses_the_rest(store: Store) {
    batch_contract(store).await;
}

async fn batch_contract(store: Store) {
    let (alice, bob, eve) = (user("alice"), user("bob"), user("eve"));
    let chat = store.direct(&alice, &bob).await.unwrap();
    let device = store.add_device(&alice, "a").await.unwrap().device;
    let bobs = store.add_device(&bob, "b").await.unwrap().device;
    // Bob has written (seq 1): his receipts are shared.
    store.append(&chat.id, &bob, &bobs, "hello", "{}", 1).await.unwrap();
    let append = |sender: &UserId, client_id: &str| Write::Append {
        conversation: chat.id,
        sender: sender.clone(),
        device,
        client_id: client_id.into(),
        body: format!("{{\"text\":\"{client_id}\"}}"),
        now_ms: 1,
        push_delay_ms: None,
        effect: Effect::Ordinary,
    };
    let batch = [
        append(&alice, "one"),
        append(&eve, "intruder"),
        append(&alice, "one"),
        Write::Ack { user: bob.clone(), device: bobs, conversation: chat.id, seq: 2, read: false },
        Write::Ack { user: eve.clone(), device: bobs, conversation: chat.id, seq: 2, read: false },
        append(&alice, "two"),
        append(&alice, ""),
        Write::Ack { user: bob.clone(), device: bobs, conversation: chat.id, seq: 3, read: true },
    ];
    let results = store.write_batch(batch.to_vec()).await;
    assert_eq!(results.len(), 8);
    let seq = |r: &Result<Written, StoreError>| match r {
        Ok(Written::Appended(a, _)) => Some(a.message().seq),
        _ => None,
    };
    assert!(matches!(results[0], Ok(Written::Appended(Appended::New(_), _))));
    assert_eq!(seq(&results[0]), Some(2));
    assert!(matches!(results[1], Err(StoreError::NotMember)));
    assert!(matches!(results[2], Ok(Written::Appended(Appended::Duplicate(_), _))), "{:?}", results[2]);
    assert_eq!(seq(&results[2]), Some(2));
    match &results[3] {
        Ok(Written::Acked(acked)) => {
            assert_eq!(acked.device, Cursor { delivered: 2, read: 0 });
            assert_eq!(acked.receipt, Some(Cursor { delivered: 2, read: 0 }), "bob's receipt moved");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(results[4], Err(StoreError::NotMember)));
    assert_eq!(seq(&results[5]), Some(3), "the refused writes took no seq");
    assert!(matches!(results[6], Err(StoreError::Invalid(_))));
    match &results[7] {
        Ok(Written::Acked(acked)) => {
            assert_eq!(acked.device, Cursor { delivered: 3, read: 3 });
            assert_eq!(acked.receipt, Some(Cursor { delivered: 3, read: 3 }));
        }
        other => panic!("{other:?}"),
    }
    let log: Vec<i64> = store.messages_after(&chat.id, &bob, 0, 10).await.unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(log, vec![1, 2, 3]);
    assert_eq!(store.sync_one(&bob, &bobs, &chat.id).await.unwrap().delivered, 3);
    assert!(store.write_batch(Vec::new()).await.is_empty());
}

/// Two writers (two nodes, or two of PostgreSQL's writers) committing batches that touch the same
/// conversations in opposite orders: each batch locks them in one order, so none waits on the
/// other in a cycle (PostgreSQL would abort one with "deadlock detected").
async fn crossed_batches_do_not_deadlock(store: Store) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let x = store.direct(&alice, &bob).await.unwrap().id;
    let y = store.direct(&alice, &carol).await.unwrap().id;
    let device = store.add_device(&alice, "a").await.unwrap().device;
    let append = move |conversation, client_id: String| Write::Append {
        conversation,
        sender: user("alice"),
        device,
        client_id,
        body: "{\"text\":\"crossed\"}".into(),
        now_ms: 1,
        push_delay_ms: None,
        effect: Effect::Ordinary,
    };
    let rounds = 40;
    let writers = [(x, y), (y, x)].map(|(first, second)| {
        let store = store.clone();
        tokio::spawn(async move {
            for round in 0..rounds {
                let batch = [append(first, format!("{first}-{round}")), append(second, format!("{second}-{round}-b"))];
                for result in store.write_batch(batch.to_vec()).await {
                    assert!(matches!(result, Ok(Written::Appended(Appended::New(_), _))), "{result:?}");
                }
            }
        })
    });
    for writer in writers {
        writer.await.unwrap();
    }
    for conversation in [x, y] {
        let log = store.messages_after(&conversation, &alice, 0, 1000).await.unwrap();
        assert_eq!(log.len(), 2 * rounds, "every append of both writers landed");
    }
}
