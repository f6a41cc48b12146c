"""mesh/natsconf.py: the nats-server configuration text and its validation (the real server
reads it in tests/integration/test_mesh_nats.py)."""
from __future__ import annotations

import pytest

from mesh import natsconf
from mesh.natsconf import ServerSettings, User


def users():
    return [User("mesh", "m-pass", "mesh"), User("node-1", "n_pass.1", "node")]


def test_render_roles_and_jetstream(tmp_path):
    text = natsconf.render(ServerSettings(store_dir=str(tmp_path), port=4333), users())
    assert 'listen: "0.0.0.0:4333"' in text
    assert f'store_dir: "{tmp_path}"' in text and "tls {" not in text
    mesh, node = text.split('user: "mesh"')[1].split('user: "node-1"')
    assert '"swarm.decisions.>", "$JS.API.>"' in mesh and '"_INBOX_MESH.>"' in mesh
    assert '"$JS.API.CONSUMER.CREATE.SWARM_DECISIONS",' in node
    assert '"swarm.>"' in node.split("deny")[1]        # denied to nodes, explicitly
    assert '"$JS.API.>"' not in node


def test_tls_block_verifies_clients_when_a_ca_is_given(tmp_path):
    s = ServerSettings(store_dir=str(tmp_path), tls_cert="/c.pem", tls_key="/k.pem",
                       tls_ca="/ca.pem")
    text = natsconf.render(s, users())
    assert 'cert_file: "/c.pem"' in text and 'ca_file: "/ca.pem"' in text
    assert "verify: true" in text


@pytest.mark.parametrize("make, message", [
    (lambda: User("mesh", "pw", "admin"), "has role 'admin', not mesh or node"),
    (lambda: User("a b", "pw", "node"), "NATS user name 'a b' must be"),
    (lambda: User("n", 'p"w', "node"), "NATS user password"),
    (lambda: ServerSettings(store_dir="/x", port=0), "NATS port 0 is not between"),
    (lambda: ServerSettings(store_dir="/x", tls_cert="/c"), "needs both a certificate and a key"),
    (lambda: ServerSettings(store_dir="/x", tls_ca="/ca"), "needs a server certificate"),
    (lambda: natsconf.render(ServerSettings(store_dir="/x"), [User("n", "p", "node")]),
     "needs a mesh user"),
    (lambda: natsconf.render(ServerSettings(store_dir="/x"),
                             [User("m", "p", "mesh"), User("m", "q", "node")]), "unique"),
])
def test_errors_are_one_sentence(make, message):
    with pytest.raises(ValueError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def test_write_fleet_keeps_existing_passwords(tmp_path):
    settings = ServerSettings(store_dir=str(tmp_path / "js"))
    first = natsconf.write_fleet(tmp_path, settings, nodes=("node-1",))
    assert set(first) == {"config", "mesh", "node-1"}
    for path in first.values():
        assert path.stat().st_mode & 0o777 == 0o600
    password = first["node-1"].read_text().strip()
    assert len(password) >= 32 and f'password: "{password}"' in first["config"].read_text()
    again = natsconf.write_fleet(tmp_path, settings, nodes=("node-1", "node-2"))
    assert again["node-1"].read_text().strip() == password
    assert 'user: "node-2"' in again["config"].read_text()
