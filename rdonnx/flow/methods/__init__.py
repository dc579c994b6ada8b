"""Methods with their own preparation or flow: pqi, hsic, surp."""
