// SPDX-License-Identifier: MIT
// asio_tls_echo — a TLS echo server on standalone Asio, written the way Asio's
// own SSL example (src/examples/cpp11/ssl/server.cpp) writes one.
//
// Like asio_echo, over asio::ssl::stream<tcp::socket>: one asio::io_context run
// by N threads; each session does async_handshake, then async_read_some into its
// own 16 KiB buffer and asio::async_write of what it read, then reads again (one
// chain of handlers per session, so no strand). The ssl::context is the
// example's (default_workarounds, no_sslv2, single_dh_use, a certificate chain
// and a PEM key) with TLS 1.2 as the lowest version, like the other TLS peers;
// everything else is Asio's and OpenSSL's default.
//
//   asio_tls_echo --port P [--host H] --cert FILE --key FILE [--threads N]
//                                                   (default threads: CPUs online)
//
// Prints "listening on H:P" once ready; exits 0 on SIGINT/SIGTERM; usage and
// exit 2 on bad arguments.
#define ASIO_STANDALONE 1
#define ASIO_NO_DEPRECATED 1
#include <asio.hpp>
#include <asio/ssl.hpp>

#include <sys/resource.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

using asio::ip::tcp;

namespace {

class session : public std::enable_shared_from_this<session> {
public:
    explicit session(asio::ssl::stream<tcp::socket> s) : sock_(std::move(s)) {}
    void start() { do_handshake(); }

private:
    void do_handshake()
    {
        auto self = shared_from_this();
        sock_.async_handshake(asio::ssl::stream_base::server, [this, self](const std::error_code &ec) {
            if (!ec)
                do_read();
        });
    }
    void do_read()
    {
        auto self = shared_from_this();
        sock_.async_read_some(asio::buffer(buf_), [this, self](std::error_code ec, std::size_t n) {
            if (!ec)
                do_write(n);
        });
    }
    void do_write(std::size_t n)
    {
        auto self = shared_from_this();
        asio::async_write(sock_, asio::buffer(buf_.data(), n), [this, self](std::error_code ec, std::size_t) {
            if (!ec)
                do_read();
        });
    }
    asio::ssl::stream<tcp::socket> sock_;
    std::array<char, 16384> buf_;
};

class server {
public:
    server(asio::io_context &io, const tcp::endpoint &ep, const std::string &cert, const std::string &key)
        : acc_(io), ctx_(asio::ssl::context::tls_server)
    {
        ctx_.set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                         asio::ssl::context::no_sslv3 | asio::ssl::context::no_tlsv1 |
                         asio::ssl::context::no_tlsv1_1 | asio::ssl::context::single_dh_use);
        ctx_.use_certificate_chain_file(cert);
        ctx_.use_private_key_file(key, asio::ssl::context::pem);
        acc_.open(ep.protocol());
        acc_.set_option(tcp::acceptor::reuse_address(true));
        acc_.bind(ep);
        acc_.listen(asio::socket_base::max_listen_connections);
        do_accept();
    }
    tcp::endpoint local() const { return acc_.local_endpoint(); }

private:
    void do_accept()
    {
        acc_.async_accept([this](std::error_code ec, tcp::socket s) {
            if (!ec) {
                std::error_code ig;
                s.set_option(tcp::no_delay(true), ig);
                std::make_shared<session>(asio::ssl::stream<tcp::socket>(std::move(s), ctx_))->start();
            }
            do_accept();
        });
    }
    tcp::acceptor acc_;
    asio::ssl::context ctx_;
};

void usage(std::FILE *f)
{
    std::fprintf(f, "usage: asio_tls_echo --port P [--host H] --cert FILE --key FILE [--threads N]\n"
                    "  standalone Asio TLS echo server (asio::ssl::stream): one io_context run by N threads\n"
                    "  --host H      address to bind (default 0.0.0.0)\n"
                    "  --cert FILE   certificate chain (PEM)\n"
                    "  --key FILE    private key (PEM)\n"
                    "  --threads N   threads running the io_context (default: CPUs online)\n");
}

bool parse_long(const char *s, long lo, long hi, long &out)
{
    char *end;
    long v = std::strtol(s, &end, 10);
    if (*s == 0 || *end || v < lo || v > hi)
        return false;
    out = v;
    return true;
}

} // namespace

int main(int argc, char **argv)
{
    std::string host = "0.0.0.0", cert, key;
    long port = -1;
    long threads = static_cast<long>(std::thread::hardware_concurrency());
    if (threads < 1)
        threads = 1;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            usage(stderr);
            return 2;
        }
        const char *v = argv[++i];
        if (a == "--port") {
            if (!parse_long(v, 0, 65535, port)) {
                usage(stderr);
                return 2;
            }
        } else if (a == "--host") {
            host = v;
        } else if (a == "--cert") {
            cert = v;
        } else if (a == "--key") {
            key = v;
        } else if (a == "--threads") {
            if (!parse_long(v, 1, 256, threads)) {
                usage(stderr);
                return 2;
            }
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (port < 0 || cert.empty() || key.empty()) {
        usage(stderr);
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    try {
        asio::io_context io(static_cast<int>(threads));
        std::error_code ec;
        auto addr = asio::ip::make_address(host, ec);
        if (ec) {
            std::fprintf(stderr, "asio_tls_echo: bad host %s\n", host.c_str());
            return 2;
        }
        server srv(io, tcp::endpoint(addr, static_cast<unsigned short>(port)), cert, key);
        asio::signal_set sigs(io, SIGINT, SIGTERM);
        sigs.async_wait([&io](std::error_code, int) { io.stop(); });
        auto ep = srv.local();
        std::printf("listening on %s:%u (asio %d.%d.%d, %s, %ld thread%s)\n", ep.address().to_string().c_str(),
                    ep.port(), ASIO_VERSION / 100000, ASIO_VERSION / 100 % 1000, ASIO_VERSION % 100,
                    OpenSSL_version(OPENSSL_VERSION), threads, threads == 1 ? "" : "s");
        std::fflush(stdout);
        std::vector<std::thread> pool;
        for (long i = 1; i < threads; i++)
            pool.emplace_back([&io] { io.run(); });
        io.run();
        for (auto &t : pool)
            t.join();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "asio_tls_echo: %s\n", e.what());
        return 1;
    }
    return 0;
}
