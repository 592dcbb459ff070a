"""CURVE keys for the ZeroMQ planes, printed as TOML to paste into `[zmq]` sections.

    python -m pbx.keys host-a host-b            # (or pbx-keys) front + one pair per host
    python -m pbx.keys --subscriber monitor     # + an events-only client
    python -m pbx.keys --one-file               # one config for every program (one host)
    python -m pbx.keys --server-public-key KEY host-c   # a new host for an existing front

Each client host gets its own key pair (its media workers and IVR executors share
it); the front's section lists the public keys it accepts on each plane. Secret keys
never leave the host they are for: paste each section into that host's config only,
and keep the files `chmod 600`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from pbx.config import Z85_KEY_RE


@dataclass(frozen=True)
class KeyPair:
    public: str
    secret: str


def keypair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode(), secret.decode())


def _key_list(name: str, keys: Sequence[tuple[str, str]]) -> list[str]:
    if not keys:
        return [f"{name} = []"]
    return [f"{name} = [", *(f'    "{key}",  # {who}' for who, key in keys), "]"]


def render(clients: Sequence[str], subscribers: Sequence[str] = (), one_file: bool = False,
           server_public_key: str | None = None) -> str:
    """The TOML text: the front's section (unless only `server_public_key` is known),
    then one section per client and subscriber."""
    pairs = {name: keypair() for name in [*clients, *subscribers]}
    workers = [(name, pairs[name].public) for name in clients]
    watchers = [(name, pairs[name].public) for name in subscribers]
    out = ["# CURVE keys for the ZeroMQ planes (python -m pbx.keys). Set the endpoints too:",
           '# tcp://<front address>:<port> (the front binds them, e.g. "tcp://10.0.0.1:5570").',
           "# Secret keys stay on their host; chmod 600 every file holding one.", ""]
    if server_public_key is not None:
        out += ["# ---- add to the front's [zmq] lists (same plane lists as before):",
                *(f'#   media_client_keys and ivr_client_keys += "{k}"  # {who}'
                  for who, k in workers),
                *(f'#   events_client_keys += "{k}"  # {who}' for who, k in watchers), ""]
        server_public = server_public_key
    else:
        server = keypair()
        server_public = server.public
        own_pair: list[str] = []
        if one_file:  # the workers reading the front's file need a client pair of their own
            local = keypair()
            workers.insert(0, ("this host", local.public))
            own_pair = [f'client_public_key = "{local.public}"',
                        f'client_secret_key = "{local.secret}"']
        out += ["# ---- the front's config" + (" (every program reads it)" if one_file else ""),
                "[zmq]",
                f'server_public_key = "{server.public}"',
                f'server_secret_key = "{server.secret}"',
                *own_pair,
                *_key_list("media_client_keys", workers),
                *_key_list("ivr_client_keys", workers),
                *_key_list("events_client_keys", watchers), ""]
    for name in [*clients, *subscribers]:
        role = "media workers and IVR executors" if name in clients else "event subscriber"
        out += [f"# ---- {name}: its config ({role})",
                "[zmq]",
                f'server_public_key = "{server_public}"',
                f'client_public_key = "{pairs[name].public}"',
                f'client_secret_key = "{pairs[name].secret}"', ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pbx-keys", description=__doc__.splitlines()[0],
        epilog="See README.md, 'The ZeroMQ planes'.")
    parser.add_argument("clients", nargs="*", metavar="HOST",
                        help="a host running media workers and/or IVR executors")
    parser.add_argument("--subscriber", action="append", default=[], metavar="NAME",
                        help="an events-only client (the PUB socket)")
    parser.add_argument("--one-file", action="store_true",
                        help="one config read by every program (a single host on tcp)")
    parser.add_argument("--server-public-key", metavar="KEY",
                        help="keys for new clients of an existing front")
    args = parser.parse_args(argv)
    if not zmq.has("curve"):
        print("pbx-keys: this libzmq was built without CURVE support", file=sys.stderr)
        return 2
    if args.server_public_key is not None and not Z85_KEY_RE.fullmatch(args.server_public_key):
        print("pbx-keys: --server-public-key is not a CURVE key (40 Z85 characters)",
              file=sys.stderr)
        return 2
    if args.server_public_key is not None and args.one_file:
        print("pbx-keys: --one-file makes a new front key; it does not take "
              "--server-public-key", file=sys.stderr)
        return 2
    clients = args.clients or ([] if args.one_file or args.subscriber else ["workers"])
    names = [*clients, *args.subscriber]
    if len(set(names)) != len(names):
        print("pbx-keys: each host or subscriber name once", file=sys.stderr)
        return 2
    print(render(clients, args.subscriber, one_file=args.one_file,
                 server_public_key=args.server_public_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
