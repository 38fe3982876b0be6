//! The UI's HTTP surface, without a browser: always open, the right types, a CSP on pages,
//! revalidation by ETag, CORS on `/tidings.js`.

use crate::support::{ServerOptions, TestServer};

async fn keyed_server(extra: &str) -> TestServer {
    TestServer::start_with(ServerOptions {
        config: Some(format!(
            "[auth]\napi_keys = [\"k-1\"]\n{extra}\n[[jobs]]\nname = \"j\"\ncommand = [\"true\"]\n"
        )),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn pages_and_assets_are_open_typed_and_pages_carry_a_csp() {
    let server = keyed_server("").await;
    let get = |path: &str| server.http.get(server.url(path)).send();
    for page in ["/", "/channels/feeds:x", "/runs/01ABC"] {
        let resp = get(page).await.unwrap();
        assert_eq!(resp.status(), 200, "{page} is open even with api_keys");
        let h = resp.headers();
        assert_eq!(h["content-type"], "text/html; charset=utf-8", "{page}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("style-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(h["cache-control"], "no-cache");
        assert_eq!(h["x-content-type-options"], "nosniff");
    }
    for (path, kind) in [
        ("/tidings.js", "text/javascript; charset=utf-8"),
        ("/assets/ui.js", "text/javascript; charset=utf-8"),
        ("/assets/dashboard.js", "text/javascript; charset=utf-8"),
        ("/assets/channel.js", "text/javascript; charset=utf-8"),
        ("/assets/run.js", "text/javascript; charset=utf-8"),
        ("/assets/ansi.js", "text/javascript; charset=utf-8"),
        ("/assets/app.css", "text/css; charset=utf-8"),
        ("/assets/favicon.svg", "image/svg+xml"),
    ] {
        let resp = get(path).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], kind, "{path}");
        // Unchanged content revalidates to a 304.
        let etag = resp.headers()["etag"].clone();
        let again = server
            .http
            .get(server.url(path))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
    assert_eq!(get("/assets/missing.js").await.unwrap().status(), 404);
    // The API behind the pages still wants a key.
    assert_eq!(get("/api/channels").await.unwrap().status(), 401);
}

#[tokio::test]
async fn the_client_library_follows_cors_origins() {
    let server = keyed_server("[server]\ncors_origins = [\"https://allowed.example\"]\n").await;
    let with_origin = |origin: &'static str| {
        server
            .http
            .get(server.url("/tidings.js"))
            .header("origin", origin)
            .send()
    };
    let allowed = with_origin("https://allowed.example").await.unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://allowed.example"
    );
    let other = with_origin("https://other.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}
