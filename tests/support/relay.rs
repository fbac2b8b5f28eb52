//! An SMTP relay the test can take down and bring back: a TCP proxy in front of Mailpit.
//! Down, it answers every connection `421` (service not available) and hangs up, and cuts
//! the connections it was carrying, as a relay going away does; up, it forwards to Mailpit.
//! The shared Mailpit is never stopped, so other tests' mail keeps flowing.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy; dropping it stops it.
pub struct Relay {
    pub port: u16,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay in front of `target`, starting `up` or down.
    pub async fn start(target: SocketAddr, up: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (sender, state) = watch::channel(up);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, target, state.clone()));
            }
        });
        Self {
            port,
            up: sender,
            task,
        }
    }

    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut client: TcpStream, target: SocketAddr, mut state: watch::Receiver<bool>) {
    if !*state.borrow_and_update() {
        let _ = client
            .write_all(b"421 4.3.2 test relay down, try again later\r\n")
            .await;
        let _ = client.shutdown().await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        // Taken down: the connections it carried are cut too.
        _ = state.wait_for(|up| !*up) => {}
    }
}
