"""The FT API's WSGI application: routes, input checks, errors.

::

    GET  /                          the version document (no token needed)
    GET  /v1/servers                the caller's project's FT servers
    GET  /v1/servers/{id}           one server
    POST /v1/servers/{id}/action    {"failover": {}} or {"reprotect": {}}

Everything under ``/v1`` runs behind keystonemiddleware's ``auth_token``
(options in ``[keystone_authtoken]``) and is allowed by oslo.policy
(:mod:`.policy`). Every input is checked before use; a bad one is a 400
with one message naming it. doc/api.rst is the reference::

    app = build_app(conf)                       # auth_token in front
    app = FTApp(service, enforcer, conf)        # bare (tests)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, Optional

import webob
import webob.dec
from oslo_config import cfg
from oslo_context import context as oslo_context

from mftvm_openstack.api import conf as api_conf
from mftvm_openstack.api import policy
from mftvm_openstack.api.service import (
    APIError,
    BadRequest,
    Forbidden,
    FTService,
    NotFound,
)
from mftvm_openstack.contract.ftapi import (
    API_VERSION,
    PROJECT_ID_PATTERN,
    SERVER_ID_PATTERN,
    ServerAction,
    ServerList,
    Version,
    VersionLink,
)
from mftvm_openstack.contract.record import ContractError, shown

LOG = logging.getLogger(__name__)

JSON = 'application/json'
_SERVER_ID_RE = re.compile(SERVER_ID_PATTERN)
_PROJECT_ID_RE = re.compile(PROJECT_ID_PATTERN)
_TRUE, _FALSE = ('true', '1', 'yes'), ('false', '0', 'no')
#: the query parameters each listing takes
LIST_PARAMS = ('limit', 'all_projects', 'project_id')


def _json_response(status: int, body: Any) -> webob.Response:
    resp = webob.Response(status=status, content_type=JSON, charset='utf-8')
    resp.text = json.dumps(body, sort_keys=True)
    return resp


def error_response(status: int, title: str, message: str) -> webob.Response:
    return _json_response(status, {'error': {
        'code': status, 'title': title, 'message': message}})


def version_document(host_url: str) -> dict[str, Any]:
    version = Version(id=f'{API_VERSION}.0', status='CURRENT', links=(
        VersionLink(rel='self', href=f'{host_url}/{API_VERSION}/'),))
    return {'versions': [version.to_dict()]}


class ListQuery:
    """``GET /v1/servers``'s query, checked: ``limit`` (1 to
    ``[ft_api] max_servers``), ``all_projects`` (a boolean),
    ``project_id``. Unknown or repeated parameters are refused."""

    def __init__(self, params: Any, max_servers: int) -> None:
        for key in params.keys():
            if key not in LIST_PARAMS:
                raise BadRequest(f'unknown query parameter {shown(key)} '
                                 f'(parameters: {", ".join(LIST_PARAMS)})')
            if len(params.getall(key)) > 1:
                raise BadRequest(f'query parameter {key} given more than '
                                 f'once')
        self.limit = max_servers
        if 'limit' in params:
            text = params['limit']
            if not re.fullmatch(r'[0-9]{1,6}', text) or \
                    not 1 <= int(text) <= max_servers:
                raise BadRequest(f'limit: must be an integer from 1 to '
                                 f'{max_servers} (got {shown(text)})')
            self.limit = int(text)
        self.all_projects = False
        if 'all_projects' in params:
            text = params['all_projects'].lower()
            if text not in _TRUE + _FALSE:
                raise BadRequest(f'all_projects: must be true or false '
                                 f'(got {shown(params["all_projects"])})')
            self.all_projects = text in _TRUE
        self.project_id: Optional[str] = None
        if 'project_id' in params:
            text = params['project_id']
            if not _PROJECT_ID_RE.fullmatch(text):
                raise BadRequest(f'project_id: must match '
                                 f'{PROJECT_ID_PATTERN} (got {shown(text)})')
            self.project_id = text
        if self.all_projects and self.project_id is not None:
            raise BadRequest('all_projects and project_id: give one of '
                             'them, not both')


def check_server_id(text: str) -> str:
    if not _SERVER_ID_RE.fullmatch(text):
        raise BadRequest(f'server id: must be a UUID (got {shown(text)})')
    return text


class FTApp:
    """The ``/v1`` application, behind ``auth_token``: it trusts the
    ``X-*`` identity headers only once auth_token confirmed them."""

    def __init__(self, service: FTService, enforcer: Any,
                 conf: cfg.ConfigOpts) -> None:
        self.service = service
        self.enforcer = enforcer
        self.max_servers = int(conf.ft_api.max_servers)
        self.max_body = int(conf.ft_api.max_request_body_bytes)
        self.routes: list[tuple[re.Pattern[str], dict[str, Callable[
            ..., webob.Response]]]] = [
            (re.compile(r'/v1/?'), {'GET': self.version}),
            (re.compile(r'/v1/servers/?'), {'GET': self.list}),
            (re.compile(r'/v1/servers/([^/]+)/?'), {'GET': self.show}),
            (re.compile(r'/v1/servers/([^/]+)/action/?'),
             {'POST': self.action}),
        ]

    @webob.dec.wsgify
    def __call__(self, req: webob.Request) -> webob.Response:
        try:
            return self.dispatch(req)
        except APIError as exc:
            if exc.status >= 500:
                LOG.warning('%s %s: %s', req.method, req.path, exc)
            return error_response(exc.status, exc.title, str(exc))
        except Exception:
            LOG.exception('%s %s failed', req.method, req.path)
            return error_response(500, 'Internal Server Error',
                                  'the FT API failed; see its log')

    def dispatch(self, req: webob.Request) -> webob.Response:
        for pattern, methods in self.routes:
            match = pattern.fullmatch(req.path_info)
            if match is None:
                continue
            handler = methods.get(req.method)
            if handler is None:
                resp = error_response(
                    405, 'Method Not Allowed',
                    f'{req.method} is not allowed on {req.path_info}; '
                    f'use {", ".join(methods)}')
                resp.allow = tuple(methods)
                return resp
            return handler(req, *match.groups())
        raise NotFound(f'no resource {shown(req.path_info)}')

    # -- who asks --

    def context(self, req: webob.Request) -> oslo_context.RequestContext:
        if req.environ.get('HTTP_X_IDENTITY_STATUS') != 'Confirmed':
            # Only auth_token sets this; without it the X-* headers are
            # the client's own words.
            raise Forbidden('no confirmed identity (is auth_token in the '
                            'pipeline?)')
        ctx = oslo_context.RequestContext.from_environ(req.environ)
        if not ctx.project_id:
            raise Forbidden('a project-scoped token is needed')
        return ctx

    def project_of(self, ctx: oslo_context.RequestContext) -> str:
        return str(ctx.project_id)

    def allowed(self, rule: str, ctx: Any, project_id: str) -> bool:
        return policy.allowed(self.enforcer, rule, ctx,
                              {'project_id': project_id})

    # -- handlers --

    def version(self, req: webob.Request) -> webob.Response:
        return _json_response(200, {'version': version_document(
            req.host_url)['versions'][0]})

    def list(self, req: webob.Request) -> webob.Response:
        ctx = self.context(req)
        query = ListQuery(req.GET, self.max_servers)
        own = self.project_of(ctx)
        project: Optional[str] = own
        if query.all_projects or (query.project_id is not None
                                  and query.project_id != own):
            if not self.allowed(policy.LIST_ALL_PROJECTS, ctx, own):
                raise Forbidden('listing another project\'s servers is '
                                'not allowed')
            project = None if query.all_projects else query.project_id
        elif not self.allowed(policy.LIST, ctx, own):
            raise Forbidden('listing FT servers is not allowed')
        servers = self.service.list(project, query.limit)
        return _json_response(200, ServerList(
            servers=tuple(servers)).to_dict())

    def _visible(self, req: webob.Request, server_id: str) -> Any:
        ctx = self.context(req)
        server = self.service.lookup(check_server_id(server_id))
        if not self.allowed(policy.SHOW, ctx, server.project_id):
            # as if it did not exist: do not confirm another project's id
            raise NotFound(f'no server {server_id}')
        return ctx, server

    def show(self, req: webob.Request, server_id: str) -> webob.Response:
        _, server = self._visible(req, server_id)
        return _json_response(200, {
            'server': self.service.show(server).to_dict()})

    def action(self, req: webob.Request, server_id: str) -> webob.Response:
        body = self.read_json(req)
        ctx, server = self._visible(req, server_id)
        try:
            action = ServerAction.from_body(body)
        except ContractError as exc:
            raise BadRequest(str(exc)) from None
        rule = {'failover': policy.FAILOVER,
                'reprotect': policy.REPROTECT}[action.action.value]
        if not self.allowed(rule, ctx, server.project_id):
            raise Forbidden(f'{action.action.value} is not allowed')
        result = self.service.act(server, action)
        return _json_response(200, result.to_dict())

    def read_json(self, req: webob.Request) -> Any:
        """The request's JSON body, bounded by ``max_request_body_bytes``
        (checked before anything is read)."""
        if req.content_type != JSON:
            raise BadRequest(f'Content-Type: must be {JSON} (got '
                             f'{shown(req.content_type or "none")})')
        length = req.content_length
        if length is None:
            raise BadRequest('Content-Length: required (a body of at most '
                             f'{self.max_body} bytes)')
        if length > self.max_body:
            raise BodyTooLarge(f'body: at most {self.max_body} bytes (got '
                               f'{length})')
        raw = req.body_file.read(length)
        try:
            return json.loads(raw.decode('utf-8'))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f'body: not JSON ({exc})') from None


class BodyTooLarge(APIError):
    status, title = 413, 'Request Entity Too Large'


class Root:
    """``/`` answers the version document to anyone; everything else
    goes to ``authed`` (the API behind auth_token)."""

    def __init__(self, authed: Callable[..., Iterable[bytes]]) -> None:
        self.authed = authed

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get('PATH_INFO', '') in ('', '/'):
            req = webob.Request(environ)
            if req.method not in ('GET', 'HEAD'):
                resp = error_response(405, 'Method Not Allowed',
                                      f'{req.method} is not allowed on /; '
                                      f'use GET')
                resp.allow = ('GET', 'HEAD')
            else:
                resp = _json_response(300, version_document(req.host_url))
            return resp(environ, start_response)
        return self.authed(environ, start_response)


def build_service(conf: cfg.ConfigOpts) -> FTService:
    """The service on Nova (the ``[nova]`` service user) and the agents
    (``[DEFAULT] transport_url``)."""
    from keystoneauth1 import loading as ks_loading

    from mftvm_openstack.agent import rpcapi
    from mftvm_openstack.api.inventory import NovaInventory

    auth = ks_loading.load_auth_from_conf_options(conf, api_conf.NOVA_GROUP)
    session = ks_loading.load_session_from_conf_options(
        conf, api_conf.NOVA_GROUP, auth=auth)
    adapter = ks_loading.load_adapter_from_conf_options(
        conf, api_conf.NOVA_GROUP, session=session, auth=auth)
    transport = rpcapi.get_transport(conf)
    return FTService(
        NovaInventory(adapter),
        rpcapi.AgentAPI(transport, conf, timeout=conf.ft_api.agent_timeout),
        rpcapi.AgentAPI(transport, conf,
                        timeout=conf.ft_api.action_timeout),
        max_hosts=conf.ft_api.max_hosts)


def build_app(conf: cfg.ConfigOpts,
              service: Optional[FTService] = None) -> Root:
    """The whole WSGI application: ``/`` open, ``/v1`` behind
    keystonemiddleware's auth_token (configured from ``conf``)."""
    # imported here: it registers [keystone_authtoken] on import
    from keystonemiddleware import auth_token

    app = FTApp(service or build_service(conf), policy.get_enforcer(conf),
                conf)
    authed = auth_token.AuthProtocol(app, {'oslo_config_config': conf})
    return Root(authed)


def init_application() -> Root:
    """The WSGI entry point (``mftvm-api-wsgi``, for uWSGI or
    mod_wsgi): reads ``/etc/mftvm/mftvm-api.conf``, or the files that
    ``MFTVM_API_CONFIG`` names (comma-separated)."""
    import os

    from oslo_log import log as oslo_log

    files = os.environ.get('MFTVM_API_CONFIG',
                           '/etc/mftvm/mftvm-api.conf').split(',')
    conf = cfg.CONF
    api_conf.register_opts(conf)
    oslo_log.register_options(conf)
    conf([], project='mftvm', prog='mftvm-api',
         default_config_files=[f for f in files if f])
    oslo_log.setup(conf, 'mftvm-api')
    return build_app(conf)
