"""Who may do what with the FT API: oslo.policy rules, defaults in code.

A tenant reads its own project's FT servers; an admin reads any
project's and alone may fail a server over or re-protect it. An operator
overrides a rule in ``/etc/mftvm/policy.yaml`` (``[oslo_policy]
policy_file``); ``oslopolicy-sample-generator --namespace mftvm.api``
writes every rule with its default::

    enforcer = get_enforcer(conf)
    allowed(enforcer, FAILOVER, context, target={'project_id': p})

Each rule's target is the server's project (``%(project_id)s``).
"""

from __future__ import annotations

from typing import Any

from oslo_config import cfg
from oslo_policy import policy

ADMIN = 'role:admin'
#: the caller's token is scoped to the server's project
OWNER = 'project_id:%(project_id)s'
ADMIN_OR_READER = f'{ADMIN} or ({OWNER} and role:reader)'

PREFIX = 'ft:server'
LIST = f'{PREFIX}:list'
LIST_ALL_PROJECTS = f'{PREFIX}:list:all_projects'
SHOW = f'{PREFIX}:show'
FAILOVER = f'{PREFIX}:failover'
REPROTECT = f'{PREFIX}:reprotect'

RULES = [
    policy.DocumentedRuleDefault(
        name=LIST, check_str=ADMIN_OR_READER,
        description='List the FT servers of the caller\'s project, with '
                    'their live protection state.',
        operations=[{'path': '/v1/servers', 'method': 'GET'}],
        scope_types=['project']),
    policy.DocumentedRuleDefault(
        name=LIST_ALL_PROJECTS, check_str=ADMIN,
        description='List the FT servers of another project, or of all '
                    'projects (query parameters project_id, '
                    'all_projects).',
        operations=[{'path': '/v1/servers?all_projects=true',
                     'method': 'GET'}],
        scope_types=['project']),
    policy.DocumentedRuleDefault(
        name=SHOW, check_str=ADMIN_OR_READER,
        description='Show one FT server. A caller this refuses is told the '
                    'server does not exist (404), so that the ids of other '
                    'projects\' servers are not confirmed.',
        operations=[{'path': '/v1/servers/{server_id}', 'method': 'GET'}],
        scope_types=['project']),
    policy.DocumentedRuleDefault(
        name=FAILOVER, check_str=ADMIN,
        description='Fail a server over to its secondary now.',
        operations=[{'path': '/v1/servers/{server_id}/action (failover)',
                     'method': 'POST'}],
        scope_types=['project']),
    policy.DocumentedRuleDefault(
        name=REPROTECT, check_str=ADMIN,
        description='Protect a server that runs unprotected again, onto '
                    'a named secondary host or the one its agent chooses.',
        operations=[{'path': '/v1/servers/{server_id}/action (reprotect)',
                     'method': 'POST'}],
        scope_types=['project']),
]


def list_rules() -> list[policy.RuleDefault]:
    """For oslopolicy-sample-generator (entry point
    ``oslo.policy.policies``, namespace ``mftvm.api``)."""
    return list(RULES)


def get_enforcer(conf: cfg.ConfigOpts) -> policy.Enforcer:
    enforcer = policy.Enforcer(conf)
    enforcer.register_defaults(RULES)
    return enforcer


def allowed(enforcer: policy.Enforcer, rule: str, context: Any,
            target: dict[str, Any]) -> bool:
    """Whether ``context`` (an oslo.context RequestContext) may ``rule``
    on ``target``; never raises for a refusal."""
    return bool(enforcer.authorize(rule, target, context, do_raise=False))
