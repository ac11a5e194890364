//! What one deployment's replicas should do in one controller pass: pure decision logic over a
//! view of its live replicas, shared by plain scaling and rolling updates.
//!
//! Contract:
//! - With every live replica on the current version, the plan scales: it starts the missing
//!   replicas, or stops the surplus running ones, least loaded first (the controller drains
//!   them: not routable at once, `StopReplica` with the graceful shutdown timeout).
//! - With replicas of an older version (the deployment's model or engine options changed), it
//!   rolls: one new replica starts at a time; each time one runs, one old running replica (the
//!   least loaded) is stopped, so at least `target` replicas serve throughout when the cluster has
//!   room for one replica more. Without that room it stops one old replica first (only when none
//!   is stopping already) so the new one can take its place.
//! - Nothing starts while the deployment is backing off after failed starts, and a rollout
//!   whose new replicas cannot start never stops more than the one old replica that made room.

/// A live (starting or running, on a live worker) replica as the plan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaView {
    pub id: String,
    /// Runs the deployment's current version.
    pub current: bool,
    /// Running (as opposed to starting).
    pub running: bool,
    /// Head in-flight plus reported running and waiting requests.
    pub load: u64,
}

/// The situation of one deployment.
#[derive(Clone, Copy, Debug)]
pub struct Situation {
    pub target: usize,
    /// Starting is allowed (no failure backoff in progress).
    pub may_start: bool,
    /// Some live worker has room for one more replica now.
    pub room_for_one: bool,
    /// Replicas of this deployment being stopped (they still hold their devices).
    pub stopping: usize,
}

/// The pass's decision: how many new replicas to start, which replicas to stop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaPlan {
    pub start: usize,
    pub stop: Vec<String>,
    /// Present while replicas of an older version remain.
    pub rollout: Option<RolloutProgress>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolloutProgress {
    /// Running replicas on the new version.
    pub updated: usize,
    /// Live replicas still on an old version.
    pub outdated: usize,
    /// No worker had room for an extra replica, so an old one makes way first.
    pub in_place: bool,
}

/// Decides the pass for one deployment (see the module docs).
pub fn plan(replicas: &[ReplicaView], situation: Situation) -> ReplicaPlan {
    let target = situation.target;
    let (current, outdated): (Vec<&ReplicaView>, Vec<&ReplicaView>) = replicas.iter().partition(|r| r.current);
    let new_running = current.iter().filter(|r| r.running).count();
    let new_starting = current.len() - new_running;
    let mut plan = ReplicaPlan::default();

    if outdated.is_empty() {
        if current.len() < target && situation.may_start {
            plan.start = target - current.len();
        } else if current.len() > target {
            plan.stop = least_loaded_running(&current, current.len() - target);
        }
        return plan;
    }

    // Rolling: an old replica goes for every new one running beyond the target.
    let excess = (new_running + outdated.len()).saturating_sub(target);
    plan.stop = least_loaded_running(&outdated, excess);
    if new_running + new_starting > target {
        plan.stop.extend(least_loaded_running(&current, new_running + new_starting - target));
    }
    let mut in_place = false;
    if new_starting == 0 && new_running < target && situation.may_start {
        if situation.room_for_one {
            plan.start = 1;
        } else if plan.stop.is_empty() && situation.stopping == 0 {
            plan.stop = least_loaded_running(&outdated, 1);
            in_place = !plan.stop.is_empty();
        }
    }
    plan.rollout = Some(RolloutProgress { updated: new_running, outdated: outdated.len(), in_place });
    plan
}

/// The ids of up to `count` running replicas of `replicas`, least loaded first.
fn least_loaded_running(replicas: &[&ReplicaView], count: usize) -> Vec<String> {
    let mut running: Vec<&&ReplicaView> = replicas.iter().filter(|r| r.running).collect();
    running.sort_by(|a, b| (a.load, &a.id).cmp(&(b.load, &b.id)));
    running.into_iter().take(count).map(|r| r.id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, current: bool, running: bool, load: u64) -> ReplicaView {
        ReplicaView { id: id.into(), current, running, load }
    }

    fn situation(target: usize) -> Situation {
        Situation { target, may_start: true, room_for_one: true, stopping: 0 }
    }

    #[test]
    fn scaling_starts_the_missing_replicas_and_stops_the_least_loaded_surplus() {
        let two = [view("a", true, true, 5), view("b", true, true, 1)];
        assert_eq!(plan(&two, situation(4)).start, 2);
        assert_eq!(plan(&two, situation(1)).stop, ["b"]);
        assert_eq!(plan(&two, situation(2)), ReplicaPlan::default());
        assert_eq!(plan(&two, Situation { may_start: false, ..situation(4) }).start, 0, "backing off");
    }

    #[test]
    fn a_rolling_update_replaces_one_replica_at_a_time_keeping_the_target_serving() {
        // Walk a 2-replica deployment through its update, applying each plan as the controller
        // would, and check that 2 replicas serve at every step.
        let mut replicas = vec![view("old-1", false, true, 0), view("old-2", false, true, 3)];
        let mut next_id = 0;
        for _ in 0..10 {
            let p = plan(&replicas, situation(2));
            let serving = replicas.iter().filter(|r| r.running).count() - p.stop.len();
            assert!(serving >= 2, "only {serving} would serve: {replicas:?} {p:?}");
            assert!(p.start <= 1, "one new replica at a time");
            replicas.retain(|r| !p.stop.contains(&r.id));
            if p.rollout.is_none() {
                break;
            }
            // Starting replicas come up before the next pass.
            for r in replicas.iter_mut() {
                r.running = true;
            }
            for _ in 0..p.start {
                next_id += 1;
                replicas.push(view(&format!("new-{next_id}"), true, false, 0));
            }
        }
        let ids: Vec<&str> = replicas.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["new-1", "new-2"]);
    }

    #[test]
    fn the_least_loaded_old_replica_goes_first_and_only_once_a_new_one_runs() {
        let starting = [view("old-1", false, true, 4), view("old-2", false, true, 1), view("new", true, false, 0)];
        let p = plan(&starting, situation(2));
        assert_eq!((p.start, p.stop.len()), (0, 0), "the new replica still starts: wait");
        let running = [view("old-1", false, true, 4), view("old-2", false, true, 1), view("new", true, true, 0)];
        let p = plan(&running, situation(2));
        assert_eq!(p.stop, ["old-2"]);
        assert_eq!(p.start, 1);
        assert_eq!(p.rollout, Some(RolloutProgress { updated: 1, outdated: 2, in_place: false }));
    }

    #[test]
    fn without_room_for_an_extra_replica_one_old_replica_makes_way() {
        let full = [view("old-1", false, true, 0), view("old-2", false, true, 2)];
        let no_room = Situation { room_for_one: false, ..situation(2) };
        let p = plan(&full, no_room);
        assert_eq!((p.start, p.stop.as_slice()), (0, ["old-1".to_string()].as_slice()));
        assert!(p.rollout.is_some_and(|r| r.in_place));
        // While that one is still stopping, no second one goes.
        let p = plan(&full[1..], Situation { stopping: 1, ..no_room });
        assert!(p.stop.is_empty());
    }

    #[test]
    fn a_rollout_that_cannot_start_stops_nothing() {
        let old = [view("old-1", false, true, 0), view("old-2", false, true, 0)];
        let p = plan(&old, Situation { may_start: false, room_for_one: false, ..situation(2) });
        assert_eq!((p.start, p.stop.len()), (0, 0));
        assert!(p.rollout.is_some());
    }

    #[test]
    fn a_smaller_target_during_a_rollout_stops_old_replicas_first() {
        let replicas = [view("old-1", false, true, 0), view("old-2", false, true, 0), view("new", true, true, 0)];
        let p = plan(&replicas, situation(1));
        assert_eq!(p.stop, ["old-1", "old-2"]);
        assert_eq!(p.start, 0);
    }
}
