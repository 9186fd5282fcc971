from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from router.config import ApiKeyConfig, AuthConfig
from router.errors import Forbidden, NotFound, Unauthorized
from router.tenancy import ANONYMOUS, Tenancy, Tenant


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def tenancy(tmp_path: Path) -> Tenancy:
    (tmp_path / "salt").write_text("s3cret\n")
    (tmp_path / "admin").write_text("adm\n")
    return Tenancy(AuthConfig(
        api_keys=[ApiKeyConfig(sha256=_digest("key-a"), tenant="acme"),
                  ApiKeyConfig(sha256=_digest("key-b"), tenant="globex"),
                  ApiKeyConfig(sha256=_digest("key-c"), tenant="initech", allow_client_salt=True),
                  ApiKeyConfig(sha256=_digest("key-d"), tenant="acme-eu")],
        salt_secret_file=str(tmp_path / "salt"), admin_token_file=str(tmp_path / "admin"),
        shared_salt_groups={"acme-group": ["acme", "acme-eu"]}))


def test_api_keys_identify_tenants(tenancy: Tenancy) -> None:
    assert tenancy.identify({"authorization": "Bearer key-a"}).name == "acme"
    with pytest.raises(Unauthorized):
        tenancy.identify({})
    with pytest.raises(Unauthorized):
        tenancy.identify({"authorization": "Bearer nope"})
    with pytest.raises(Unauthorized):
        tenancy.identify({"authorization": "Basic key-a"})


def test_salts_are_per_tenant_and_ignore_client_salts(tenancy: Tenancy) -> None:
    acme, globex = Tenant("acme"), Tenant("globex")
    a = tenancy.salt_for(acme, None)
    assert a and a == tenancy.salt_for(acme, "whatever-the-client-says")
    b = tenancy.salt_for(globex, a)  # sending acme's salt gets globex nothing of acme's
    assert b and b != a


def test_groups_share_and_chosen_salts_stay_inside_the_tenant(tenancy: Tenancy) -> None:
    assert tenancy.salt_for(Tenant("acme"), None) == tenancy.salt_for(Tenant("acme-eu"), None)
    initech = Tenant("initech", allow_client_salt=True)
    own = tenancy.salt_for(initech, "team-1")
    assert own != tenancy.salt_for(initech, "team-2")
    assert own not in {tenancy.salt_for(Tenant("acme"), None), "team-1"}
    assert tenancy.salt_for(ANONYMOUS, "team-1") not in {own, "team-1"}


def test_without_tenancy_the_client_salt_passes_through() -> None:
    t = Tenancy(AuthConfig())
    assert t.identify({}) is ANONYMOUS
    assert t.salt_for(ANONYMOUS, "x") == "x" and t.salt_for(ANONYMOUS, None) is None


def test_trusted_header(tmp_path: Path) -> None:
    t = Tenancy(AuthConfig(tenant_header="X-Tenant-Id"))
    assert t.identify({"x-tenant-id": "acme"}).name == "acme"
    assert t.salt_for(Tenant("acme"), None) != t.salt_for(Tenant("globex"), None)


def test_admin_endpoints(tenancy: Tenancy) -> None:
    tenancy.check_admin({"authorization": "Bearer adm"})
    with pytest.raises(Forbidden):
        tenancy.check_admin({"authorization": "Bearer wrong"})
    with pytest.raises(NotFound):
        Tenancy(AuthConfig()).check_admin({"authorization": "Bearer adm"})
    # Beside a tenant's API key in Authorization, the admin token travels in x-admin-token.
    tenancy.check_admin({"authorization": "Bearer key-a", "x-admin-token": "adm"})
    with pytest.raises(Forbidden):
        tenancy.check_admin({"authorization": "Bearer adm", "x-admin-token": "wrong"})
    with pytest.raises(Forbidden):
        tenancy.check_admin({"authorization": "Bearer key-a"})


def test_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CR_ADMIN", "tok")
    Tenancy(AuthConfig(admin_token_env="CR_ADMIN")).check_admin({"x-admin-token": "tok"})
    monkeypatch.delenv("CR_ADMIN")
    with pytest.raises(ValueError, match="CR_ADMIN"):
        Tenancy(AuthConfig(admin_token_env="CR_ADMIN"))
