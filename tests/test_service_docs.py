"""/docs and /redoc load Swagger UI and ReDoc from the gateway itself, not from a CDN (an
offline host would show a blank page). The browser check is in test_service_browser.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1] / "model_repository"


@pytest.fixture(scope="module")
def client():
    # No lifespan (no `with`): the docs need no model.
    return TestClient(create_app(Settings(repository=REPO, api_key=None)))


def _urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)\s*=\s*"([^"]+)"', html) + re.findall(r"url:\s*'([^']+)'", html)


@pytest.mark.parametrize("page, asset, marker", [("/docs", "swagger-ui-bundle.js", "SwaggerUIBundle"),
                                                  ("/redoc", "redoc.standalone.js", "Redoc")])
def test_docs_pages_load_local_assets(client, page, asset, marker):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = _urls(r.text)
    assert f"/docs/assets/{asset}" in urls, urls
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from another origin"
        got = client.get(url)
        assert got.status_code == 200 and len(got.content) > 1000, (url, got.status_code)
    js = client.get(f"/docs/assets/{asset}")
    assert js.headers["content-type"].startswith("text/javascript") and marker in js.text[:2_000_000]


def test_only_listed_assets_are_served(client):
    for name in ("core.py", "..%2f..%2fpyproject.toml", "index.html"):
        assert client.get(f"/docs/assets/{name}").status_code == 404, name
