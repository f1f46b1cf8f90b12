"""The SMS form, for email-to-SMS gateways: one line of plain text, at most 160 characters with
the subject (gateways prepend it, so there is none), with the event, the data and the time."""

from __future__ import annotations

from email.message import EmailMessage

from webhook_server.channels import text
from webhook_server.channels.email import new_message
from webhook_server.settings import Settings
from webhook_server.store.records import Notification

SMS_LIMIT = 160
# Email-to-SMS gateways of North American and a few other carriers: an address at one of
# these gets the short plain-text form.
SMS_GATEWAY_DOMAINS = frozenset(
    {
        "vtext.com",
        "vzwpix.com",
        "txt.att.net",
        "mms.att.net",
        "tmomail.net",
        "messaging.sprintpcs.com",
        "pm.sprint.com",
        "msg.fi.google.com",
        "sms.myboostmobile.com",
        "myboostmobile.com",
        "sms.cricketwireless.net",
        "mms.cricketwireless.net",
        "email.uscc.net",
        "vmobl.com",
        "mymetropcs.com",
        "text.republicwireless.com",
        "mailmymobile.net",
        "sms.rogers.com",
        "txt.bell.ca",
        "msg.telus.com",
        "txt.freedommobile.ca",
        "pcs.rogers.com",
        "txt.bellmobility.ca",
        "sms.alltelwireless.com",
        "message.ting.com",
        "textmsg.uscellular.com",
        "mmst5.tracfone.com",
        "cspire1.com",
        "sms.ntwls.net",
    }
)


def is_sms_gateway(address: str) -> bool:
    """True when the address is at a known email-to-SMS gateway."""
    return address.rsplit("@", 1)[-1].lower() in SMS_GATEWAY_DOMAINS


def sms_text(n: Notification, settings: Settings, budget: int = SMS_LIMIT) -> str:
    """One line: "motion on Storage unit 12 at 18:02:11 EST: data…", at most `budget` characters."""
    event = n.event
    name = text.event_name(event, 40)
    if n.kind == "summary":
        name = f"{name} x{n.repeats} since {text.summary_since(n, settings)}"
    when = text.local_time(text.happened_at(event), settings)
    head = f"{name} on {text.device_label(event, settings, 30)} at {when}"
    room = budget - len(head) - 2
    data = text.event_data(event, room) if room > 3 else ""
    return text.clean(f"{head}: {data}" if data else head, budget)


def render_sms(n: Notification, settings: Settings) -> EmailMessage:
    """The SMS form: no subject, plain text only, within 160 characters."""
    message = new_message(n, settings)
    # Gateways prepend the subject, so there is none; set_content adds a final newline.
    message.set_content(sms_text(n, settings, SMS_LIMIT - 1))
    return message
