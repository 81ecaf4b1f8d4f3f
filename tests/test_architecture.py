"""What the import contracts in ``.importlinter`` cannot say on their own.

``lint-imports`` (run by ``make lint``) checks the contracts; these tests keep the
contracts honest: the client contract must name every client module (a new one
left out would be unchecked), and the layers must name every server-side package.
"""

from __future__ import annotations

import configparser
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
SERVER_SIDE = ("laneway.broker", "laneway.workers")


def contract(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(ROOT / ".importlinter")
    return parser[f"importlinter:contract:{name}"]


def listed(section: configparser.SectionProxy, key: str) -> set[str]:
    return {line.strip() for line in section[key].replace("|", "\n").splitlines() if line.strip()}


def test_the_client_contract_names_every_client_module() -> None:
    graph = grimp.build_graph("laneway")
    client = {m for m in graph.find_children("laneway") if m not in SERVER_SIDE}
    assert client == listed(contract("client"), "source_modules")
    # The package root is no source of the contract (that would take in the server
    # side too): it may import only client modules.
    assert not {m for m in graph.find_modules_directly_imported_by("laneway") if m.startswith(SERVER_SIDE)}


def test_the_layers_name_every_server_side_package() -> None:
    graph = grimp.build_graph("laneway")
    layers = listed(contract("layers"), "layers")
    broker_packages = {m for m in graph.find_children("laneway.broker") if graph.find_children(m)}
    assert broker_packages <= layers
    assert "laneway.workers" in layers
    # Nothing loose at the top of laneway.broker: every module sits in a layer's folder.
    loose = {m for m in graph.find_children("laneway.broker") if not graph.find_children(m)}
    assert loose == set()
