"""Sending one message over SMTP: a default TLS context, STARTTLS or SSL, a timeout on every step,
`quit()` in `finally`. Errors are raised as smtplib and the network give them; `notify`
decides which are worth a retry."""

from __future__ import annotations

import smtplib
import socket
import ssl
from contextlib import suppress
from email.message import EmailMessage

from webhook_server.settings import SmtpSettings


class SmtpTransport:
    """One connection and one recipient per message; one TLS context for the process."""

    def __init__(self, smtp: SmtpSettings) -> None:
        self.smtp = smtp
        self.tls = ssl.create_default_context(cafile=smtp.ca_file)
        # smtplib would look the FQDN up (a reverse DNS query) on every connection.
        self.local_hostname = socket.getfqdn()

    def _connect(self) -> smtplib.SMTP:
        host, port, timeout = self.smtp.host, self.smtp.port, self.smtp.timeout
        if self.smtp.security == "ssl":
            return smtplib.SMTP_SSL(host, port, self.local_hostname, timeout=timeout, context=self.tls)
        return smtplib.SMTP(host, port, self.local_hostname, timeout=timeout)

    def transmit(self, message: EmailMessage, recipient: str) -> None:
        client = self._connect()
        try:
            if self.smtp.security == "starttls":
                client.starttls(context=self.tls)
            if self.smtp.password:
                client.login(self.smtp.username or self.smtp.sender, self.smtp.password)
            client.send_message(message, from_addr=self.smtp.sender, to_addrs=[recipient])
        finally:
            with suppress(smtplib.SMTPException, OSError):
                client.quit()
            client.close()
