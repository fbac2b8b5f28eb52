//! Group commit: lanes hand their routed batches to a few committers, and a committer
//! commits whatever has gathered while it was busy in one transaction.
//!
//! Lanes are per tenant so that a slow tenant delays only itself, but under a spread load
//! that makes batches small: 1 000 events/s over ten tenants was a transaction per event,
//! each a handful of statements, and PostgreSQL took 40 % of the machine's cores for it.
//! A group takes the batches of every lane waiting at the moment, so the number of
//! transactions follows the committers' pace instead of the number of tenants. A lane still
//! has at most one batch in flight, so its order is kept, and two groups never hold the same
//! tenant (their users' rows never make two transactions wait on each other).
//!
//! Small batches and large ones go to different committers ([`Commits`]). Small batches
//! (a spread load) go to a few committers, so that they gather; large ones (a backlog, where
//! every lane's batch is full) go to more committers, which commit side by side: a backlog
//! drains faster with several transactions in flight than with a few large ones.

use tokio::sync::{Mutex, mpsc, oneshot};

/// A lane's batch, waiting for a committer.
pub(super) struct Job<T, E> {
    pub items: Vec<T>,
    /// The batch's fate: committed, or why not (the lane waits and tries again).
    pub done: oneshot::Sender<Result<(), E>>,
}

/// Where lanes send their batches: by size, to the committers of small batches or to those
/// of large ones.
pub(super) struct Commits<T, E> {
    small: mpsc::Sender<Job<T, E>>,
    large: mpsc::Sender<Job<T, E>>,
    /// The size from which a batch is large.
    large_from: usize,
}

// Derived `Clone` would require `T: Clone`.
impl<T, E> Clone for Commits<T, E> {
    fn clone(&self) -> Self {
        Self {
            small: self.small.clone(),
            large: self.large.clone(),
            large_from: self.large_from,
        }
    }
}

impl<T, E> Commits<T, E> {
    /// The two queues: small batches (fewer than `large_from` items) and large ones. Each
    /// lane has at most one batch waiting, so `bound` is only a backstop.
    pub fn new(large_from: usize, bound: usize) -> (Self, Queue<T, E>, Queue<T, E>) {
        let (small, small_jobs) = mpsc::channel(bound);
        let (large, large_jobs) = mpsc::channel(bound);
        let commits = Self {
            small,
            large,
            large_from,
        };
        (commits, Queue::new(small_jobs), Queue::new(large_jobs))
    }

    /// Queues `job` for its committers; `Err` if they are all gone.
    pub async fn send(&self, job: Job<T, E>) -> Result<(), mpsc::error::SendError<Job<T, E>>> {
        if job.items.len() >= self.large_from {
            self.large.send(job).await
        } else {
            self.small.send(job).await
        }
    }
}

/// The committers' shared queue.
pub(super) struct Queue<T, E> {
    inner: Mutex<Inner<T, E>>,
}

struct Inner<T, E> {
    jobs: mpsc::Receiver<Job<T, E>>,
    /// A job taken that did not fit in the last group: the next group starts with it.
    next: Option<Job<T, E>>,
}

impl<T, E> Queue<T, E> {
    fn new(jobs: mpsc::Receiver<Job<T, E>>) -> Self {
        Self {
            inner: Mutex::new(Inner { jobs, next: None }),
        }
    }

    /// Waits for a job, then takes the ones already waiting behind it while the group
    /// holds at most `max_items` items (a first job larger than that goes alone). `None`
    /// once every lane has gone and nothing is left.
    pub async fn gather(&self, max_items: usize) -> Option<Vec<Job<T, E>>> {
        let mut inner = self.inner.lock().await;
        let first = match inner.next.take() {
            Some(job) => job,
            None => inner.jobs.recv().await?,
        };
        let mut items = first.items.len();
        let mut group = vec![first];
        while items < max_items {
            let Ok(job) = inner.jobs.try_recv() else {
                break;
            };
            if items + job.items.len() > max_items {
                inner.next = Some(job);
                break;
            }
            items += job.items.len();
            group.push(job);
        }
        Some(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(items: Vec<u32>) -> (Job<u32, ()>, oneshot::Receiver<Result<(), ()>>) {
        let (done, result) = oneshot::channel();
        (Job { items, done }, result)
    }

    #[tokio::test]
    async fn a_group_takes_what_waits_in_order_up_to_its_size() {
        let (tx, rx) = mpsc::channel(16);
        let queue = Queue::new(rx);
        for items in [vec![1, 2], vec![3], vec![4, 5, 6], vec![7]] {
            tx.send(job(items).0).await.unwrap();
        }
        let items = |group: Vec<Job<u32, ()>>| -> Vec<Vec<u32>> {
            group.into_iter().map(|j| j.items).collect()
        };
        // 2 + 1 fit in 4; the next job (3 items) would not: it starts the next group.
        assert_eq!(items(queue.gather(4).await.unwrap()), [vec![1, 2], vec![3]]);
        assert_eq!(
            items(queue.gather(4).await.unwrap()),
            [vec![4, 5, 6], vec![7]]
        );

        // A job larger than a group goes alone rather than never.
        tx.send(job(vec![8, 9, 10, 11, 12]).0).await.unwrap();
        tx.send(job(vec![13]).0).await.unwrap();
        assert_eq!(
            items(queue.gather(4).await.unwrap()),
            [vec![8, 9, 10, 11, 12]]
        );
        assert_eq!(items(queue.gather(4).await.unwrap()), [vec![13]]);

        // Every sender gone and nothing held: the committers stop.
        drop(tx);
        assert!(queue.gather(4).await.is_none());
    }

    #[tokio::test]
    async fn small_and_large_batches_go_to_their_own_committers() {
        let (commits, small, large) = Commits::new(3, 16);
        for items in [vec![1], vec![2, 3, 4], vec![5, 6], vec![7, 8, 9, 10]] {
            commits.send(job(items).0).await.unwrap();
        }
        drop(commits);
        let all = |queue: Queue<u32, ()>| async move {
            let mut all = Vec::new();
            while let Some(group) = queue.gather(100).await {
                all.extend(group.into_iter().map(|j| j.items));
            }
            all
        };
        assert_eq!(all(small).await, [vec![1], vec![5, 6]]);
        assert_eq!(all(large).await, [vec![2, 3, 4], vec![7, 8, 9, 10]]);
    }

    #[tokio::test]
    async fn a_held_job_is_not_lost_when_the_lanes_go() {
        let (tx, rx) = mpsc::channel(16);
        let queue = Queue::new(rx);
        tx.send(job(vec![1, 2, 3]).0).await.unwrap();
        tx.send(job(vec![4, 5]).0).await.unwrap();
        drop(tx);
        assert_eq!(queue.gather(4).await.unwrap().len(), 1);
        let last = queue.gather(4).await.unwrap();
        assert_eq!(last[0].items, [4, 5]);
        assert!(queue.gather(4).await.is_none());
    }
}
