"""The wire format shared by the agent and the coordinator. Pure: no I/O."""
