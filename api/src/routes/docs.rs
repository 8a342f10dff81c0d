//! `GET /openapi.json` and Swagger UI under `/docs` (its assets are compiled into the binary:
//! nothing is fetched from elsewhere). The description itself is assembled in
//! [`crate::openapi`].

use std::sync::{Arc, LazyLock};

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::OpenApi as OpenApiDoc;

use crate::error::ApiError;

/// `GET /openapi.json` and the Swagger UI under `/docs`, for merging into the api's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs_redirect))
        .route("/docs/", get(docs_page))
        .route("/docs/{*file}", get(docs_asset))
}

/// Swagger UI's configuration: this api's description.
static SWAGGER: LazyLock<Arc<utoipa_swagger_ui::Config<'static>>> =
    LazyLock::new(|| Arc::new(utoipa_swagger_ui::Config::from("/openapi.json")));

#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    summary = "This OpenAPI description",
    tag = "documentation",
    responses((status = 200, description = "This OpenAPI description", body = Object)),
    security(()),
)]
/// `GET /openapi.json`: this description.
pub async fn openapi_json() -> Json<OpenApiDoc> {
    Json(crate::openapi::document().clone())
}

#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "docs_redirect",
    summary = "Interactive docs (redirect)",
    tag = "documentation",
    responses((status = 303, description = "Redirects to `/docs/`",
        headers(("Location" = String, description = "`/docs/`")))),
    security(()),
)]
/// `GET /docs`: 303 to `/docs/`.
pub async fn docs_redirect() -> Redirect {
    Redirect::to("/docs/")
}

#[utoipa::path(
    get,
    path = "/docs/",
    operation_id = "docs",
    summary = "Interactive docs (Swagger UI)",
    tag = "documentation",
    responses((status = 200, description = "Swagger UI for this description", body = String,
        content_type = "text/html")),
    security(()),
)]
/// `GET /docs/`: the Swagger UI page.
pub async fn docs_page() -> Response {
    swagger_file("index.html")
}

#[utoipa::path(
    get,
    path = "/docs/{file}",
    operation_id = "docs_asset",
    summary = "Swagger UI files",
    tag = "documentation",
    params(("file" = String, Path, description = "A Swagger UI file, e.g. `swagger-ui.css`, `swagger-ui-bundle.js`")),
    responses(
        (status = 200, description = "The file (JavaScript, CSS, HTML or an image), compiled into the binary",
            content((String = "application/javascript"), (String = "text/css"), (String = "text/html"), (String = "image/png"), (String = "application/json"))),
        (status = 404, description = "No such file (empty body)"),
    ),
    security(()),
)]
/// `GET /docs/{file}`: a file of Swagger UI; `swagger-initializer.js` points it at
/// `/openapi.json`.
pub async fn docs_asset(Path(file): Path<String>) -> Response {
    swagger_file(&file)
}

/// A Swagger UI file with its content type; 404 with an empty body when there is none.
fn swagger_file(path: &str) -> Response {
    match utoipa_swagger_ui::serve(path, SWAGGER.clone()) {
        Ok(Some(file)) => (
            [(header::CONTENT_TYPE, file.content_type)],
            file.bytes.into_owned(),
        )
            .into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => ApiError::Internal(anyhow::anyhow!("swagger ui: {e}")).into_response(),
    }
}
