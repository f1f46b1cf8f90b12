"""A real SMTP server for tests and benchmarks: aiosmtpd in a thread, on a free port.

    with SmtpSink() as sink:
        ...send to 127.0.0.1:sink.port...
        messages = sink.wait_for(1)

It can require STARTTLS (`starttls_cert`), speak TLS from the first byte (`ssl_cert`), require
AUTH (`require_auth`), answer slowly (`delay`) or refuse every message (`refuse_code`, at DATA or,
with `refuse_stage="rcpt"`, at RCPT). `delay`, `refuse_code` and `refuse_stage` may be changed
while it runs.
"""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import ipaddress
import ssl
import threading
import time
import warnings
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


class _Controller(Controller):
    """aiosmtpd's Controller, but port 0 means "any free port" and `.port` tells which."""

    def _create_server(self) -> Any:
        return self._bind()

    async def _bind(self) -> asyncio.AbstractServer:
        server = await self.loop.create_server(
            self._factory_invoker, host=self.hostname, port=self.port, ssl=self.ssl_context
        )
        self.port = server.sockets[0].getsockname()[1]
        return server

    def factory(self) -> SMTP:
        # AUTH without STARTTLS is deliberate here (a plain sink, or TLS from the first byte,
        # which aiosmtpd cannot see); keep its warning out of every test report.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            smtp: SMTP = super().factory()  # type: ignore[no-untyped-call]
        return smtp


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.sink.refuse_code is not None and self.sink.refuse_stage == "rcpt":
            return f"{self.sink.refuse_code} recipient refused by the test sink"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.delay:
            await asyncio.sleep(self.sink.delay)
        if self.sink.refuse_code is not None:
            return f"{self.sink.refuse_code} message refused by the test sink"
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
        message = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.sink.record(message, envelope.mail_from or "", list(envelope.rcpt_tos))
        return "250 Message accepted for delivery"


class SmtpSink:
    """A real SMTP server that keeps what it receives, parsed with the default policy."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        starttls_cert: tuple[str, str] | None = None,
        ssl_cert: tuple[str, str] | None = None,
        require_auth: tuple[str, str] | None = None,
        delay: float = 0.0,
        refuse_code: int | None = None,
        refuse_stage: str = "data",
    ) -> None:
        self.host = host
        self.port = port
        self.starttls_cert = starttls_cert
        self.ssl_cert = ssl_cert
        self.require_auth = require_auth
        self.delay = delay
        self.refuse_code = refuse_code
        self.refuse_stage = refuse_stage
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str], float]] = []
        self.auth_attempts = 0
        self._arrived = threading.Condition()
        self._controller: _Controller | None = None

    def record(self, message: EmailMessage, mail_from: str, rcpt_tos: list[str]) -> None:
        with self._arrived:
            self.messages.append(message)
            self.envelopes.append((mail_from, rcpt_tos, time.monotonic()))
            self._arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[EmailMessage]:
        """At least `count` messages, waiting up to `timeout` seconds; AssertionError if not."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"expected {count} messages, got {len(self.messages)}")
            return list(self.messages)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        self.auth_attempts += 1
        expected = self.require_auth
        given = (data.login, data.password) if isinstance(data, LoginPassword) else None
        if expected and given == (expected[0].encode(), expected[1].encode()):
            return AuthResult(success=True)
        # handled=False lets aiosmtpd answer 535; handled=True would leave the client hanging.
        return AuthResult(success=False, handled=False)

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"hostname": self.host, "port": self.port, "ready_timeout": 5.0}
        if self.starttls_cert:
            options.update(tls_context=_server_context(self.starttls_cert), require_starttls=True)
        if self.ssl_cert:
            options["ssl_context"] = _server_context(self.ssl_cert)
        if self.require_auth:
            options.update(
                authenticator=self._authenticate,
                auth_required=True,
                # aiosmtpd only sees STARTTLS; with ssl_cert the connection is TLS anyway.
                auth_require_tls=bool(self.starttls_cert),
            )
        return options

    def start(self) -> SmtpSink:
        if self._controller is not None:
            raise RuntimeError("the sink is already running")
        controller = _Controller(_Handler(self), **self._options())
        controller.start()
        self._controller = controller
        self.port = controller.port
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _server_context(cert: tuple[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*cert)
    return context


def make_self_signed_cert(directory: str | Path) -> tuple[str, str]:
    """(certfile, keyfile) for localhost and 127.0.0.1; the cert is its own CA, to trust as one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    certfile, keyfile = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyfile.chmod(0o600)
    return str(certfile), str(keyfile)
