"""Delivery events: what providers report by webhook after they took a message.

``POST /v1/events/{provider name}`` hands the raw request to the provider kind's webhook
module here (``ratatoskr/events/<kind>.py``: verify the signature on the raw bytes, then parse
into normalized :class:`~ratatoskr.queue.DeliveryEvent` values); :mod:`.receiver` stores them in
the queue, counts them and turns a hard bounce into a notice. The webhook keys themselves are
provider settings (``webhook_*`` in ``ratatoskr/providers/<kind>.py``).
"""
