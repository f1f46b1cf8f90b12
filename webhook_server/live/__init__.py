"""The live stream: subscribers, the hub, and the listen client."""
