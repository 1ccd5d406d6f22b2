"""The p2pchat client, with the original ``client.py``'s command line.

    python client.py                       # tracker on 127.0.0.1:7472; asks for a name first
    python client.py -s 192.168.1.10 -n ana

Chat lines go to stdout (``<name> :: text``, one message per line; earlier messages, from the local log
or fetched from the room, as ``[history YYYY-MM-DD HH:MM] <name> :: text``); system lines (``* ...``) and
logs go to stderr. With a terminal, the prompt stays intact while messages arrive; with a pipe, lines are read
from stdin and the client stays in the room after stdin ends (like the original) unless
``--exit-on-eof`` is given.
"""

import argparse
import configparser
import getpass
import logging
import os
import sys
import threading
import time
import unicodedata
from collections.abc import Collection
from pathlib import Path
from typing import Optional, Union

from . import (
    MAX_NAME_CHARS,
    AddressInUse,
    HistorySynced,
    InvalidInput,
    Message,
    Notice,
    P2PChatError,
    Peer,
    PeerClosed,
    PeerInfo,
    PeerJoined,
    PeerLeft,
    PeerRenamed,
    TrackerUnreachable,
    __version__,
    default_data_dir,
    machine,
    new_invite_code,
)
from ._cli import (
    Leave,
    chat,
    colours_wanted,
    count,
    handle_signals,
    invoked_as,
    port,
    setup_logging,
    signals_deferred,
    status,
    use_terminal,
)

NAME_PROMPT = "Escreva um nome: "
DEFAULT_NAME = "Unknow"
TRACKER_RETRY_SECONDS = (1.0, 2.0, 4.0, 5.0)  # then every 5 s, as the original
COMMANDS = {
    "/who": "list the members of the room",
    "/invite": "in a private room: print a code that lets someone join without the secret",
    "/nick NEW": "change your name",
    "/ignore NAME": "hide NAME's messages (for you only); /ignore alone lists them",
    "/unignore NAME": "show NAME's messages again",
    "/trust NAME KEY": "private rooms: NAME really has the new key KEY (as /who shows it)",
    "/untrust NAME": "private rooms: forget NAME's key; the next one it proves is taken",
    "/help": "this list",
    "/quit": "leave (Ctrl-C and Ctrl-D too)",
}

EXAMPLES = """\
examples:
  python client.py                          tracker on this machine, port 7472; asks for a name
  python client.py -s 192.168.1.10 -n ana   tracker on another machine, name given
  python client.py --listen 7500            listen on a fixed port (to forward it on a router)
  python client.py --history 0 --no-history   no earlier messages shown, nothing written to disk
  python client.py -r plans --private       a private room: asks for its invite code or secret (Enter: a new one)
  P2PCHAT_SECRET=... python client.py -r plans   the same, the secret from the environment
  P2PCHAT_SERVER=chat.example.org P2PCHAT_NAME=ana python client.py
                                            settings from the environment (or client.ini: docs/cli.md)
  printf 'ana\\nhello\\n' | python client.py --exit-on-eof

Type a line and press Enter to send it to everyone; /quit, Ctrl-C or Ctrl-D leaves.
"""


# The program's name as invoked (`client.py`, `p2pchat-client`, `p2pchat client`), set by `main`.
PROG = "client.py"


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--secret` must not quietly mean `--secret-file`.
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog=PROG,
        description="Join a p2pchat room: ask the tracker who is there, then chat with everyone directly.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-s", "--server", help="the tracker's IP address or host name (default: 127.0.0.1, "
                        "or none when --peer is given)")
    parser.add_argument("-p", "--port", type=port, help="the tracker's port (default: 7472)")
    parser.add_argument("-n", "--name", help=f"your name, 1 to {MAX_NAME_CHARS} characters without '>' (default: ask on stdin)")
    parser.add_argument("-r", "--room", help="the room to join (default: the room original peers are in)")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="a member to connect to directly (repeatable); the others are learnt from it")
    parser.add_argument("-l", "--listen", type=port, metavar="PORT", help="port to listen on for other peers (default: any free port)")
    parser.add_argument("--history", type=count, default=100, metavar="N",
                        help="earlier messages to show on start: the last N from your log, and the newest N you "
                             "do not have, asked from a member (default: %(default)s; 0: none)")
    parser.add_argument("--no-history", action="store_true",
                        help="write no message log to disk (this session's messages are kept in memory only)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help=f"where the message log is kept (default: {default_data_dir()}; "
                             "or set P2PCHAT_DATA_DIR)")
    parser.add_argument("--identity", type=Path, metavar="FILE",
                        help="your key pair (created on first use, readable by you only; default: identity.json "
                             "in the data directory)")
    parser.add_argument("--private", action="store_true",
                        help="make --room private: ask for its invite code or secret on the terminal (Enter "
                             "makes a new room with a random key). Only people with the same key can join or read it")
    parser.add_argument("--secret-file", type=Path, metavar="FILE",
                        help="read the private room's secret (or invite code) from FILE; the environment "
                             "variable P2PCHAT_SECRET works too. Never on the command line, which others can read")
    parser.add_argument("--json", action="store_true",
                        help="machine mode: JSON commands on stdin, one JSON object per event on stdout "
                             "(needs --name; see docs/cli.md for the schema)")
    parser.add_argument("--exit-on-eof", action="store_true", help="leave the room when stdin ends instead of staying to listen")
    parser.add_argument("-d", "--debug", action="store_true", help="print debug logs (connections, tracker exchange) on stderr")
    parser.add_argument("--version", action="version", version=f"p2pchat {__version__}")
    return parser


# Settings that may also come from the environment or the config file: flag, then environment
# variable, then config file, then the default.
SETTINGS = {"server": "P2PCHAT_SERVER", "port": "P2PCHAT_PORT", "name": "P2PCHAT_NAME", "room": "P2PCHAT_ROOM"}
DEFAULTS = {"server": None, "port": 7472, "name": None, "room": ""}


def config_file() -> Path:
    """Where the client's settings are read from: `P2PCHAT_CONFIG`, else `client.ini` in the platform's
    config directory (`$XDG_CONFIG_HOME/p2pchat` or `~/.config/p2pchat` on Linux, `~/Library/Application
    Support/p2pchat` on macOS, `%APPDATA%\\p2pchat` on Windows)."""
    if os.environ.get("P2PCHAT_CONFIG"):
        return Path(os.environ["P2PCHAT_CONFIG"])
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "p2pchat" / "client.ini"


def apply_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill each setting not given as a flag from the environment, then the config file's `[client]`
    section, then the default; a value that is not valid stops with the place it came from."""
    path = config_file()
    section: dict[str, str] = {}
    if path.exists():
        config = configparser.ConfigParser()
        try:
            config.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError) as err:
            parser.error(f"cannot read the config file {str(path)!r}: {err}")
        section = dict(config["client"]) if config.has_section("client") else {}
        unknown = sorted(set(section) - set(SETTINGS))
        if unknown:
            parser.error(f"{str(path)!r}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    for key, variable in SETTINGS.items():
        if getattr(args, key) is not None:
            continue
        if os.environ.get(variable):
            raw, where = os.environ[variable], f"the environment variable {variable}"
        elif key in section:
            raw, where = section[key], f"{key} in {str(path)!r}"
        else:
            setattr(args, key, DEFAULTS[key])
            continue
        try:
            setattr(args, key, port(raw) if key == "port" else raw)
        except argparse.ArgumentTypeError as err:
            parser.error(f"{where}: {err}")


class SecretUnavailable(Exception):
    """The private room's secret cannot be had; the message says how to give it."""


def room_secret(args: argparse.Namespace) -> Optional[str]:
    """The private room's secret or invite code: from --secret-file, P2PCHAT_SECRET, or a prompt (with
    --private); None for an open room."""
    if args.secret_file is not None:
        secret_file: Path = args.secret_file
        try:
            secret = secret_file.read_text(encoding="utf-8")
            loose = os.name == "posix" and secret_file.stat().st_mode & 0o077
        except (OSError, UnicodeDecodeError) as err:
            raise SecretUnavailable(f"cannot read the secret file {str(secret_file)!r}: {err}") from None
        if loose:
            print(f"{PROG}: warning: other accounts on this machine can read the secret file {str(secret_file)!r}; "
                  f"chmod 600 it", file=sys.stderr)
        return secret
    # Taken out of the environment once read, so that no program started from here inherits it.
    from_env = os.environ.pop("P2PCHAT_SECRET", "")
    if from_env:
        return from_env
    if not args.private:
        return None
    if args.json or not sys.stdin.isatty():
        raise SecretUnavailable("--private asks for the secret on a terminal; without one, use --secret-file FILE "
                                "or the environment variable P2PCHAT_SECRET")
    try:
        given = getpass.getpass(f"invite code or secret for room {args.room!r} (Enter: a new room with a random key): ")
    except EOFError:
        raise SecretUnavailable("no secret given") from None
    if given.strip():
        return given
    try:
        code = new_invite_code(args.room)
    except InvalidInput as err:
        raise SecretUnavailable(str(err)) from None
    # The code is the room's key: it goes to this user's terminal only, as /invite shows it.
    print(f"new private room {args.room!r}; to invite someone, give them this code (it is the room's key): {code}")
    return code


def ask_name() -> str:
    """The original's name prompt: first input line, at most 40 characters, empty means 'Unknow'."""
    if sys.stdin.isatty():
        try:
            raw = input(NAME_PROMPT)
        except EOFError:
            raw = ""
    else:
        raw = sys.stdin.readline().rstrip("\r\n")
    return raw[:MAX_NAME_CHARS] or DEFAULT_NAME


# What a peer's text may not show as itself: controls (C0, DEL, C1: they move the cursor, clear the
# screen), format characters (bidi overrides that reorder what is shown, zero-width ones that hide
# characters) and line or paragraph separators (they break one message per line).
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def printable(text: str) -> str:
    """Show control, bidi, invisible and line-breaking characters escaped (`\\x1b`, `\\u202e`), so a
    peer cannot drive the terminal, disguise a text or break one message per line; tabs stay tabs."""
    return "".join(
        repr(c)[1:-1] if c != "\t" and unicodedata.category(c) in HIDDEN_CATEGORIES else c for c in text
    )


def who(name: Optional[str], address: tuple[str, int]) -> str:
    host, peer_port = address
    return f"{printable(name)} ({host}:{peer_port})" if name else f"{host}:{peer_port}"


def show(event: object, ignored: set[str]) -> None:
    if isinstance(event, Message):
        if event.sender in ignored:
            return
        history_at = (event.sent_at or event.received_at) if event.history else None
        sender = printable(event.sender) if event.sender is not None else None
        chat(sender, printable(event.text), history_at=history_at, signed=event.signed)
    elif isinstance(event, HistorySynced):
        if event.received:
            status(f"{event.received} earlier message(s) received from the room")
    elif isinstance(event, PeerJoined):
        status(f"{who(event.name, event.address)} joined ({link_kind(event)})")
    elif isinstance(event, PeerLeft):
        status(f"{who(event.name, event.address)} " + ("left the room" if event.clean else f"left ({event.reason})"))
    elif isinstance(event, PeerRenamed):
        status(f"{who(event.old, event.address)} is now known as {printable(event.new)}")
    elif isinstance(event, Notice):
        status(printable(event.text))


def pump_events(peer: Peer, ignored: set[str], already_shown: Collection[str]) -> None:
    while True:
        try:
            event = peer.recv_event()
        except PeerClosed:
            return
        if isinstance(event, Message) and event.id in already_shown:
            continue
        show(event, ignored)


def show_own_log(peer: Peer, limit: int, before: float, ignored: set[str]) -> set[str]:
    """The room's last messages from our own log (said before we joined); returns their ids."""
    if limit == 0:
        return set()
    logged = peer.history(limit=limit, before=before)
    for message in logged:
        show(message, ignored)
    return {m.id for m in logged if m.id}


def join(peer: Peer, server: str, tracker_port: int) -> None:
    """Join, retrying with backoff (up to every 5 s, as the original) while the tracker cannot be reached."""
    attempt = 0
    while True:
        try:
            peer.join()
            return
        except TrackerUnreachable as err:
            wait = TRACKER_RETRY_SECONDS[min(attempt, len(TRACKER_RETRY_SECONDS) - 1)]
            attempt += 1
            status(f"{err}. Retrying in {wait:.0f} s (Ctrl-C to quit). "
                   f"Is the tracker running at {server}:{tracker_port}? Use --server and --port to change it.")
            time.sleep(wait)


def list_members(peer: Peer) -> None:
    members = peer.peers()
    room = f"room {peer.room!r}" if peer.room else "the default room"
    status(f"{len(members) + 1} member(s) in {room}:")
    _, my_port = peer.address or ("", 0)
    status(f"  {peer.name} (you, port {my_port}, key {peer.fingerprint})")
    for member in members:
        status(f"  {who(member.name, member.address)} {link_kind(member)}")


def link_kind(member: Union[PeerJoined, PeerInfo]) -> str:
    """How we reach a member: its protocol; encrypted, with the key it proved (private rooms); or the
    member relaying it when there is no direct link."""
    parts: list[str] = [member.protocol or "connecting"]
    if member.encrypted:
        parts.append("encrypted")
    if member.fingerprint:
        parts.append(f"key {member.fingerprint}" + (" CHANGED: perhaps not who you met before" if member.key_changed else ""))
    if member.relayed_by is not None:
        host, port = member.relayed_by
        parts.append(f"relayed by {host}:{port}")
    return ", ".join(parts)


def run_command(peer: Peer, command: str, argument: str, ignored: set[str]) -> bool:
    """A /command typed by the user; returns False to leave."""
    if command == "/quit":
        return False
    if command == "/who":
        list_members(peer)
    elif command == "/ignore" and argument:
        ignored.add(argument)
        status(f"hiding messages from {argument} (/unignore {argument} to see them again)")
    elif command == "/ignore":
        status("ignoring: " + (", ".join(sorted(ignored)) if ignored else "nobody"))
    elif command == "/unignore":
        ignored.discard(argument)
        status(f"showing messages from {argument}")
    elif command == "/invite":
        code = peer.invite_code
        if code is None:
            status("this room is open: anyone who knows its name can join (use --private for a room with a secret)")
        else:
            status(f"invite code (it carries the room's key: give it only to people you invite): {code}")
    elif command == "/nick":
        try:
            peer.nick(argument)
            status(f"you are now known as {argument}")
        except InvalidInput as err:
            status(f"cannot use that name: {err}")
    elif command == "/trust":
        name, _, key = argument.rpartition(" ")
        if not name or not key:
            status("usage: /trust NAME KEY (the key as /who shows it)")
            return True
        try:
            peer.trust(name.strip(), key)
            status(f"{name.strip()} has key {key} from now on")
        except InvalidInput as err:
            status(f"cannot trust that key: {err}")
    elif command == "/untrust":
        if peer.untrust(argument):
            status(f"forgot {argument}'s key; the next key it proves is taken")
        else:
            status(f"no key was remembered for {argument}")
    else:
        for usage, meaning in COMMANDS.items():
            status(f"{usage:10} {meaning}")
    return True


def handle_line(peer: Peer, line: str, ignored: set[str]) -> bool:
    """Send one typed line, or run it if it is a command; returns False when the user asked to leave."""
    text = line.rstrip("\r\n")
    if not text:
        return True
    command, _, argument = text.strip().partition(" ")
    if command in ("/quit", "/who", "/invite", "/nick", "/ignore", "/unignore", "/trust", "/untrust", "/help"):
        return run_command(peer, command, argument.strip(), ignored)
    try:
        reached = peer.send(text)
    except InvalidInput as err:
        status(f"not sent: {err}")
        return True
    chat("Eu", text)
    if reached == 0:
        status("nobody else is connected; that line reached no one")
    return True


def status_bar(peer: Peer) -> str:
    """The bottom line: room, who we are, how many members, the tracker."""
    try:
        members, tracker = peer.status()
    except P2PChatError:
        return " left the room "
    room = f"room {peer.room!r}" if peer.room else "default room"
    if peer.private:
        room = f"private {room} (encrypted)"
    _, listen_port = peer.address or ("", 0)
    return f" {room} · {peer.name} on port {listen_port} · {members} other member(s) · tracker: {tracker} "


def chat_in_terminal(peer: Peer, ignored: set[str]) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    session: PromptSession[str] = PromptSession(bottom_toolbar=lambda: status_bar(peer), refresh_interval=1.0)
    with patch_stdout(raw=True):  # raw: keep the colours of the lines printed above the prompt
        while True:
            try:
                typed = session.prompt("> ")
            except (EOFError, KeyboardInterrupt):
                return
            # A paste of several lines is several messages.
            for line in typed.splitlines() or [""]:
                if not handle_line(peer, line, ignored):
                    return


def chat_from_pipe(peer: Peer, exit_on_eof: bool, ignored: set[str]) -> None:
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        if not handle_line(peer, line, ignored):
            return
    if exit_on_eof:
        return
    status("input ended; still in the room and printing messages (Ctrl-C or SIGTERM to leave)")
    while True:
        time.sleep(3600)


def fail(args: argparse.Namespace, message: str) -> None:
    """A fatal error: on stderr, and in machine mode also as a JSON object on stdout."""
    print(f"{PROG}: {message}", file=sys.stderr)
    if args.json:
        machine.emit({"type": "error", "message": message, "fatal": True})


def run(args: argparse.Namespace) -> int:
    if args.json and args.name is None:
        print(f"{PROG}: --json needs --name (stdin carries commands, not the name)", file=sys.stderr)
        return 2
    try:
        secret = room_secret(args)
    except SecretUnavailable as err:
        fail(args, str(err))
        return 2
    name = args.name if args.name is not None else ask_name()
    try:
        server = args.server if args.server is not None or args.peer else "127.0.0.1"
        peer = Peer(name, server, args.port, listen=args.listen, room=args.room, peers=args.peer,
                    history=args.history, data_dir=args.data_dir, save_history=not args.no_history,
                    identity=args.identity, secret=secret)
    except (InvalidInput, ValueError) as err:
        fail(args, str(err))
        return 2
    started = time.time()
    try:
        join(peer, server or "(none)", args.port)
    except AddressInUse as err:
        fail(args, f"{err} (use --listen to choose another, or leave it out)")
        return 1
    except P2PChatError as err:
        fail(args, str(err))
        return 1
    if args.json:
        machine.run(peer)
        return 0
    ignored: set[str] = set()
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        use_terminal(colour=colours_wanted())
    try:
        from_log = show_own_log(peer, args.history, started, ignored)
        with signals_deferred():
            threading.Thread(target=pump_events, args=(peer, ignored, from_log), name="p2pchat-receiver", daemon=True).start()
            reached, listed = peer.join_result or (0, 0)
            _, listen_port = peer.address or ("", 0)
            room = f" in {'private ' if peer.private else ''}room {peer.room!r}" if peer.room else ""
            status(f"joined as {name!r}{room} (key {peer.fingerprint}), listening on port {listen_port}; "
                   f"connected to {reached} of {listed} peer(s)")
            if peer.private:
                status("private room: every link is encrypted, only holders of its secret can join, the tracker "
                       "sees an opaque id; original clients cannot join it (/invite makes a code for others)")
        if interactive:
            chat_in_terminal(peer, ignored)
        else:
            chat_from_pipe(peer, args.exit_on_eof, ignored)
    finally:
        with signals_deferred():
            peer.close()
            status("left the room")
    return 0


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    global PROG
    PROG = invoked_as(prog, "client.py")
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_settings(args, parser)
    setup_logging(args.debug)
    # Both modes show the peer's notices themselves (`* ...` lines, or notice events in --json): the
    # log would say each one a second time.
    logging.getLogger("p2pchat.notice").setLevel(logging.ERROR)
    handle_signals()
    try:
        return run(args)
    except (KeyboardInterrupt, Leave):
        # Ctrl-C or SIGTERM at any point, even while asking the name or waiting for the tracker.
        return 0


if __name__ == "__main__":
    sys.exit(main())
