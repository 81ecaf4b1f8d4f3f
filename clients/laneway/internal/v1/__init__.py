"""Generated from protos/laneway/internal/v1 (make proto): do not edit."""
