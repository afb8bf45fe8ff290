"""placeholder"""
def apply_coefficient_schedules(model, args):
    pass
def install(args):
    pass
