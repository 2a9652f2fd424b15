"""Analysis commands: figures computed from configs and finished runs, without training (`plan`, `capacity`)."""
