"""fedsafe: secure federated fine-tuning of LLMs with LoRA (FedIT).

Run, measure and defend against three threats: safety attacks by malicious clients, training-data
extraction from the global model, and exposed client updates.
"""

__version__ = "0.1.0"
