use super::*;

fn who(tenant: &str, weight: u32) -> Waiter {
    Waiter { tenant: Arc::from(tenant), weight, priority: 0 }
}

/// Pushes `n` items `(tenant, i)` for `waiter`.
fn backlog(queue: &mut FairQueue<(String, usize)>, waiter: &Waiter, n: usize) -> Vec<Place> {
    (0..n).map(|i| queue.push(waiter, (waiter.tenant.to_string(), i))).collect()
}

/// How many of the next `n` releases go to `tenant`.
fn share(queue: &mut FairQueue<(String, usize)>, n: usize, tenant: &str) -> usize {
    (0..n).filter_map(|_| queue.pop()).filter(|(t, _)| t == tenant).count()
}

#[test]
fn equal_weights_split_releases_evenly_under_a_ten_to_one_backlog() {
    let mut queue = FairQueue::default();
    backlog(&mut queue, &who("heavy", 1), 1000);
    backlog(&mut queue, &who("light", 1), 100);
    // While both wait, they alternate: the light tenant's 100 go out in the first 200 releases.
    assert_eq!(share(&mut queue, 200, "light"), 100);
    assert_eq!(queue.len(), 900);
    assert_eq!(share(&mut queue, 900, "heavy"), 900);
    assert!(queue.is_empty() && queue.tenants() == 0);
}

#[test]
fn weights_set_the_shares_while_both_tenants_wait() {
    let mut queue = FairQueue::default();
    backlog(&mut queue, &who("heavy", 1), 1000);
    backlog(&mut queue, &who("light", 4), 1000);
    let light = share(&mut queue, 500, "light");
    assert!((399..=401).contains(&light), "weight 4 of 5 takes 4/5 of 500 releases, got {light}");
    // A share of ten to one: the heavy tenant's 10x backlog does not buy it more.
    let mut queue = FairQueue::default();
    backlog(&mut queue, &who("heavy", 1), 1000);
    backlog(&mut queue, &who("light", 10), 100);
    let light = share(&mut queue, 110, "light");
    assert!((99..=100).contains(&light), "{light}");
}

#[test]
fn a_newcomer_is_released_within_one_turn_of_a_deep_backlog() {
    let mut queue = FairQueue::default();
    backlog(&mut queue, &who("heavy", 1), 1000);
    for _ in 0..50 {
        queue.pop();
    }
    queue.push(&who("light", 1), ("light".to_string(), 0));
    let next: Vec<String> = (0..2).filter_map(|_| queue.pop()).map(|(t, _)| t).collect();
    assert!(next.contains(&"light".to_string()), "{next:?}");
}

#[test]
fn idling_earns_no_credit() {
    let mut queue = FairQueue::default();
    backlog(&mut queue, &who("a", 1), 60);
    assert_eq!(share(&mut queue, 50, "a"), 50);
    // `b` was idle while `a` ran alone: once both wait they alternate, `b` gets no burst of 50.
    backlog(&mut queue, &who("b", 1), 60);
    assert_eq!(share(&mut queue, 20, "b"), 10);
}

#[test]
fn one_tenant_leaves_by_priority_then_arrival() {
    let mut queue = FairQueue::default();
    let t = |priority| Waiter { priority, ..who("t", 1) };
    for (i, p) in [0, 5, 0, -1, 5, 0].into_iter().enumerate() {
        queue.push(&t(p), i);
    }
    let order: Vec<usize> = std::iter::from_fn(|| queue.pop()).collect();
    assert_eq!(order, vec![3, 0, 2, 5, 1, 4]);
}

#[test]
fn a_removed_request_frees_its_place_and_its_tenant() {
    let mut queue = FairQueue::default();
    let places = backlog(&mut queue, &who("a", 1), 3);
    let other = queue.push(&who("b", 1), ("b".to_string(), 0));
    assert_eq!(queue.remove(&places[1]), Some(("a".to_string(), 1)));
    assert_eq!(queue.remove(&places[1]), None, "a place is taken out once");
    assert_eq!(queue.len(), 3);
    assert_eq!(queue.remove(&other), Some(("b".to_string(), 0)));
    assert_eq!(queue.tenants(), 1, "a tenant with nothing waiting is forgotten");
    let released = queue.pop().unwrap();
    assert_eq!(queue.remove(&places[0]), None, "released: no longer waiting");
    assert_eq!(released, ("a".to_string(), 0));
    assert_eq!(queue.remove(&places[2]), Some(("a".to_string(), 2)));
    assert!(queue.is_empty() && queue.tenants() == 0 && queue.turns.is_empty());
}

#[test]
fn leaving_and_coming_back_gains_no_place() {
    let mut queue = FairQueue::default();
    backlog(&mut queue, &who("a", 1), 10);
    let b = queue.push(&who("b", 1), ("b".to_string(), 0));
    queue.push(&who("c", 1), ("c".to_string(), 0));
    queue.pop();
    // `b` leaves and comes back: it now waits behind `c`, which arrived after it the first time.
    queue.remove(&b);
    queue.push(&who("b", 1), ("b".to_string(), 1));
    let order: Vec<String> = (0..3).filter_map(|_| queue.pop()).map(|(t, _)| t).collect();
    assert_eq!(order, vec!["c", "a", "b"]);
}

#[test]
fn a_full_queue_gives_the_newest_place_of_the_tenant_over_its_share() {
    let mut queue = FairQueue::default();
    backlog(&mut queue, &who("heavy", 1), 4);
    // Newcomers of another tenant take heavy's newest places until both hold as many...
    assert_eq!(queue.displace_for(&who("light", 1)), Some(("heavy".to_string(), 3)));
    queue.push(&who("light", 1), ("light".to_string(), 0));
    assert_eq!(queue.displace_for(&who("light", 1)), Some(("heavy".to_string(), 2)));
    queue.push(&who("light", 1), ("light".to_string(), 1));
    // ...then a swap would only move the excess to the other side: refused, either way.
    assert_eq!(queue.displace_for(&who("light", 1)), None);
    assert_eq!(queue.displace_for(&who("heavy", 1)), None);
    assert_eq!(queue.len(), 4);
    // What is left leaves fairly, each tenant's oldest first.
    let order: Vec<(String, usize)> = std::iter::from_fn(|| queue.pop()).collect();
    let of = |t: &str| order.iter().filter(|(o, _)| o == t).map(|(_, i)| *i).collect::<Vec<_>>();
    assert_eq!((of("heavy"), of("light")), (vec![0, 1], vec![0, 1]));
    assert!(queue.is_empty() && queue.tenants() == 0);
}

#[test]
fn displacement_follows_the_weights() {
    let mut queue = FairQueue::default();
    backlog(&mut queue, &who("big", 3), 6);
    // `small` (weight 1) may take places while big keeps more than 3 per place of small's.
    let mut taken = 0;
    while queue.displace_for(&who("small", 1)).is_some() {
        queue.push(&who("small", 1), ("small".to_string(), taken));
        taken += 1;
    }
    assert_eq!(taken, 1, "big 6 / small 0 -> 5 / 1; 4 / 2 would put small over big per weight");
    assert_eq!(queue.len(), 6);
}
