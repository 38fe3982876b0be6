//! The smallest end-to-end check: publish then read back, through the binary.

use serde_json::json;

use crate::support::TestServer;

#[tokio::test]
async fn publish_then_read_back() {
    let server = TestServer::start().await;
    let (status, body) = server.publish("smoke:a", json!({"data": {"n": 1}})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["seq"], 1);
    let (status, page) = server.get("/api/channels/smoke:a/messages?since=0").await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["data"]["n"], 1);
    assert_eq!(page["last_seq"], 1);
}
